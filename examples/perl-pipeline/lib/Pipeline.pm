package Pipeline;

# Small, real stand-ins for the helpers the seed's four programs call: a key = value config
# file, CSV validation, a spool directory as the job queue, a CSV loader into a table file,
# and resource readings from /proc. Paths come from the environment (run-pipeline.sh sets
# them) or default to var/ beside the scripts.

use strict;
use warnings;
use Exporter 'import';
use Fcntl qw(:flock);
use File::Basename qw(basename);
use File::Path qw(make_path);
use File::Spec;
use FindBin ();
use JSON::PP ();
use Time::HiRes ();

our @EXPORT = qw(parse_config validate_file generate_job_id enqueue dequeue
                 load_file_to_db cpu_percent memory_mb disk_io_mb);

my $JSON = JSON::PP->new->utf8->canonical;
my %REQUIRED = map { $_ => 1 } qw(required_columns delimiter max_file_kb);

sub spool_dir { $ENV{PIPELINE_SPOOL} // "$FindBin::Bin/var/spool" }
sub db_dir    { $ENV{PIPELINE_DB}    // "$FindBin::Bin/var/db" }

# Reads and checks a "key = value" file; returns its text (the seed measures its length).
sub parse_config {
    my $path = shift;
    open my $fh, '<', $path or die "$path: cannot read: $!\n";
    my $text = do { local $/; <$fh> };
    my %seen;
    my $n = 0;
    for my $line (split /\n/, $text) {
        $n++;
        next if $line =~ /^\s*(#|$)/;
        $line =~ /^\s*([a-z_]+)\s*=\s*(\S.*?)\s*$/ or die "$path:$n: expected 'key = value'\n";
        $seen{$1}++;
    }
    my @missing = grep { !$seen{$_} } sort keys %REQUIRED;
    die "$path: missing setting(s): @missing\n" if @missing;
    return $text;
}

sub settings {
    my $text = shift;
    return { map { /^\s*([a-z_]+)\s*=\s*(\S.*?)\s*$/ ? ($1 => $2) : () } split /\n/, $text };
}

# A file is valid when it is readable, within max_file_kb, has the required header columns
# and every row has as many fields as the header.
sub validate_file {
    my ($path, $config) = @_;
    my $cfg = settings($config);
    return 0 unless -f $path && -r _ && -s _ <= $cfg->{max_file_kb} * 1024;
    open my $fh, '<', $path or return 0;
    my $sep = quotemeta $cfg->{delimiter};
    chomp(my $header = <$fh> // return 0);
    my @columns = split /$sep/, $header, -1;
    my %have = map { $_ => 1 } @columns;
    return 0 if grep { !$have{$_} } split /\s*,\s*/, $cfg->{required_columns};
    while (my $row = <$fh>) {
        chomp $row;
        return 0 if (() = split /$sep/, $row, -1) != @columns;
    }
    return 1;
}

sub generate_job_id { sprintf 'job-%d-%d', time, $$ }

# A queue entry carries the producer's propagation headers, as message queues carry trace
# context: the SDK exported them into %ENV when the producer set its job_id. With
# PIPELINE_QUEUE=plain it holds only {id, file}, as the seed's dequeue() returns it, and the
# consumer's spans open traces of their own.
sub enqueue {
    my $file = shift;
    my $ctx = eval { $JSON->decode($ENV{MONITORING_CONTEXT} // '{}') } || {};
    my $job = {
        id   => $ctx->{job_id} // generate_job_id(),
        file => File::Spec->rel2abs($file),
    };
    if (($ENV{PIPELINE_QUEUE} // 'traced') ne 'plain') {
        $job->{traceparent} = $ENV{TRACEPARENT};
        $job->{context}     = $ENV{MONITORING_CONTEXT};
    }
    my $dir = spool_dir();
    make_path("$dir/new", "$dir/tmp");
    my $name = sprintf '%.6f-%s.json', Time::HiRes::time(), $job->{id};
    open my $fh, '>', "$dir/tmp/$name" or die "$dir/tmp/$name: $!\n";
    print {$fh} $JSON->encode($job);
    close $fh or die "$dir/tmp/$name: $!\n";
    rename "$dir/tmp/$name", "$dir/new/$name" or die "enqueue $name: $!\n";    # atomic publish
    return $job->{id};
}

# Claims the oldest entry by renaming it (safe with several consumers) and restores the
# producer's propagation headers, so the consumer's next root span joins the job's trace.
sub dequeue {
    my $dir = spool_dir();
    make_path("$dir/taken");
    for my $path (sort glob "$dir/new/*.json") {
        my $taken = "$dir/taken/" . basename($path);
        rename $path, $taken or next;
        open my $fh, '<', $taken or next;
        my $job = eval { $JSON->decode(do { local $/; <$fh> }) } or next;
        for (['TRACEPARENT', 'traceparent'], ['MONITORING_CONTEXT', 'context']) {
            my ($var, $key) = @$_;
            if (defined $job->{$key}) { $ENV{$var} = $job->{$key} } else { delete $ENV{$var} }
        }
        return { id => $job->{id}, file => $job->{file} };
    }
    return;
}

# Loads a CSV file (header id,customer,amount) into the orders table, a tab-separated file
# appended under an exclusive lock; returns the number of rows loaded.
sub load_file_to_db {
    my $path = shift;
    open my $in, '<', $path or die "$path: $!\n";
    chomp(my $header = <$in> // '');
    my @columns = split /,/, $header;
    my @rows;
    while (my $line = <$in>) {
        chomp $line;
        next unless length $line;
        my %row;
        @row{@columns} = split /,/, $line, -1;
        die "$path:$.: amount '$row{amount}' is not a number\n" unless $row{amount} =~ /^-?\d+(\.\d+)?$/;
        push @rows, join("\t", @row{qw(id customer amount)}, basename($path)) . "\n";
    }
    make_path(db_dir());
    open my $table, '>>', db_dir() . '/orders.tsv' or die db_dir() . "/orders.tsv: $!\n";
    flock $table, LOCK_EX or die "lock orders.tsv: $!\n";
    print {$table} @rows;
    close $table or die "orders.tsv: $!\n";
    return scalar @rows;
}

# CPU this process used since the previous call (the first call: since this module was loaded),
# as a percentage of one core, as psutil's cpu_percent() does: 100 is one core busy, more only
# with several threads. CPU and wall time are read over the same interval; times() since the
# process started over the wall time since the module was loaded counted perl's start-up and
# every module compiled before this one against almost no time (db_loader: 1336.9 on 2 cores).
my $HAS_CLOCKS = eval { Time::HiRes::clock_gettime(Time::HiRes::CLOCK_PROCESS_CPUTIME_ID()); Time::HiRes::clock_gettime(Time::HiRes::CLOCK_MONOTONIC()); 1 };
sub _cpu_seconds {
    return Time::HiRes::clock_gettime(Time::HiRes::CLOCK_PROCESS_CPUTIME_ID()) if $HAS_CLOCKS;
    my ($user, $system) = times;    # clock ticks only: coarse over short intervals
    return $user + $system;
}
sub _wall_seconds { $HAS_CLOCKS ? Time::HiRes::clock_gettime(Time::HiRes::CLOCK_MONOTONIC()) : Time::HiRes::time() }

# Wall time is read before the CPU time at the start and after it at the end, so the wall
# interval holds the CPU one: one busy thread reads at most 100.
my @CPU_SINCE = (_wall_seconds(), _cpu_seconds());

sub cpu_percent {
    my $cpu  = _cpu_seconds() - $CPU_SINCE[1];
    my $wall = _wall_seconds() - $CPU_SINCE[0];
    @CPU_SINCE = (_wall_seconds(), _cpu_seconds());
    return $wall > 0 ? sprintf('%.1f', 100 * $cpu / $wall) : 0;
}

sub memory_mb {
    open my $fh, '<', '/proc/self/status' or return undef;
    while (<$fh>) { return sprintf '%.1f', $1 / 1024 if /^VmRSS:\s+(\d+)\s+kB/ }
    return undef;
}

# Bytes this process read and wrote so far (rchar + wchar: every read/write call), in MiB.
sub disk_io_mb {
    open my $fh, '<', '/proc/self/io' or return undef;
    my %io = map { /^(\w+):\s+(\d+)/ ? ($1 => $2) : () } <$fh>;
    return undef unless exists $io{rchar};
    return sprintf '%.3f', ($io{rchar} + $io{wchar}) / (1024 * 1024);
}

1;
