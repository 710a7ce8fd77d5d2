#!/usr/bin/perl
# Service 2 of the seed's use case: validates an incoming file and queues it as a job.
# Usage: perl file-receiver.pl FILE   (settings from $PIPELINE_CONFIG)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../../sdk_clients/perl/lib", "$FindBin::Bin/lib";
use Monitoring::SDK;
use Pipeline;

my $file = shift // die "usage: $0 FILE\n";
my $config = parse_config($ENV{PIPELINE_CONFIG} // die "PIPELINE_CONFIG is not set\n");

# --- the seed's code, unchanged ---
my $mon = Monitoring::SDK->new(
    source => 'file-receiver',
    tcp_host => 'localhost',
    tcp_port => 17000
);

my $job_id = generate_job_id();
$mon->set_context('job_id', $job_id);
$mon->log_event('info', 'Received file', {filename => $file});

if (validate_file($file, $config)) {
    $mon->log_metric('file_valid', 1);
    enqueue($file);
    $mon->log_event('info', 'File queued');
} else {
    $mon->log_metric('file_valid', 0);
    $mon->log_event('error', 'Invalid file');
}
# --- end of the seed's code ---

print "file-receiver: $job_id $file\n";
