#!/usr/bin/perl
# The script of the seed's use case: loads one CSV file into the orders table.
# Usage: perl db_loader.pl FILE
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../../sdk_clients/perl/lib", "$FindBin::Bin/lib";
use Monitoring::SDK;
use Pipeline;

die "usage: $0 FILE\n" unless @ARGV == 1;

# --- the seed's code, unchanged ---
my $mon = Monitoring::SDK->new(
    source => 'db-loader',
    tcp_host => 'localhost',
    tcp_port => 17000
);

my $span_id = $mon->start_span('load_data');
$mon->log_event('info', 'Starting DB load', {file => $ARGV[0]});

my $rows = load_file_to_db($ARGV[0]);

$mon->log_metric('rows_loaded', $rows, 'count');
$mon->log_resource(cpu_percent(), memory_mb(), disk_io_mb());
$mon->end_span($span_id, 'success');
# --- end of the seed's code ---

print "db-loader: $rows rows from $ARGV[0]\n";
