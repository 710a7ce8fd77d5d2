#!/usr/bin/env bash
# Runs the seed's Perl pipeline end to end against a sidecar:
#   config-service, then file-receiver for each input file, then queue-service, which runs
#   db_loader.pl for every queued job.
# Environment:
#   MONITORING_SIDECAR  host:port of the sidecar (default localhost:17000)
#   PIPELINE_WORK       working directory (default: a new temporary directory)
#   PIPELINE_FILES      number of input files (default 3)
#   PIPELINE_QUEUE      traced (default: a job carries TRACEPARENT and MONITORING_CONTEXT through
#                       the spool) or plain (a job is only {id, file})
# Prints one "job <job_id> <file>" line per queued job, then the work directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MONITORING_SIDECAR="${MONITORING_SIDECAR:-localhost:17000}"
work="${PIPELINE_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/perl-pipeline.XXXXXX")}"
files="${PIPELINE_FILES:-3}"
export PIPELINE_CONFIG="$work/pipeline.conf" PIPELINE_SPOOL="$work/spool" PIPELINE_DB="$work/db"
mkdir -p "$work/incoming"

cat > "$PIPELINE_CONFIG" <<CONF
# perl-pipeline settings, read by config-service and file-receiver
required_columns = id,customer,amount
delimiter = ,
max_file_kb = 4096
CONF

# Input files of different sizes: 100, 200, 300, ... rows.
for i in $(seq 1 "$files"); do
    perl -e 'my ($n) = @ARGV; print "id,customer,amount\n";
             printf "%d,customer-%02d,%.2f\n", $_, $_ % 17, ($_ * 37 % 10000) / 100 for 1 .. $n' \
        "$((i * 100))" > "$work/incoming/batch-$i.csv"
done

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

perl "$here/config-service.pl" "$PIPELINE_CONFIG"

for i in $(seq 1 "$files"); do
    # Whoever delivers a file starts its trace; the job carries it through the queue.
    out="$(TRACEPARENT="00-$(random_hex 16)-$(random_hex 8)-01" \
           perl "$here/file-receiver.pl" "$work/incoming/batch-$i.csv")"
    read -r _ job file <<< "$out"
    echo "job $job $file"
done

perl "$here/queue-service.pl"

echo "rows in $PIPELINE_DB/orders.tsv: $(wc -l < "$PIPELINE_DB/orders.tsv")"
echo "work directory: $work"
