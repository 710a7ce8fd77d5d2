#!/usr/bin/perl
# Service 3 of the seed's use case: takes jobs from the spool and runs db_loader.pl on each,
# until the spool is empty.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../../sdk_clients/perl/lib", "$FindBin::Bin/lib";
use Monitoring::SDK;
use Pipeline;

# The seed runs "perl db_loader.pl" from the current directory: run from ours.
chdir $FindBin::Bin or die "chdir $FindBin::Bin: $!\n";

# --- the seed's code, unchanged ---
my $mon = Monitoring::SDK->new(
    source => 'queue-service',
    tcp_host => 'localhost',
    tcp_port => 17000
);

while (my $job = dequeue()) {
    my $span_id = $mon->start_span('process_job');
    $mon->set_context('job_id', $job->{id});
    
    $mon->log_progress($job->{id}, 0, 'started');
    
    # Call script
    system("perl db_loader.pl $job->{file}");
    
    $mon->log_progress($job->{id}, 100, 'completed');
    $mon->end_span($span_id, 'success');
    
    $mon->log_metric('jobs_processed', 1, 'count');
}
# --- end of the seed's code ---
