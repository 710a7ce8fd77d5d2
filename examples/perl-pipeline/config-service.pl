#!/usr/bin/perl
# Service 1 of the seed's use case: parses the pipeline configuration.
# Usage: perl config-service.pl [CONFIG_FILE]   (default: $PIPELINE_CONFIG)
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../../sdk_clients/perl/lib", "$FindBin::Bin/lib";
use Pipeline;

my $config_file = shift // $ENV{PIPELINE_CONFIG} // die "usage: $0 CONFIG_FILE\n";

# --- the seed's code, unchanged ---
use Monitoring::SDK;

my $mon = Monitoring::SDK->new(
    source => 'config-service',
    tcp_host => 'localhost',
    tcp_port => 17000
);

$mon->log_event('info', 'Reading config file', {file => $config_file});
my $config = parse_config($config_file);
$mon->log_metric('config_size_kb', length($config) / 1024, 'kilobytes');
$mon->log_event('info', 'Config loaded successfully');
# --- end of the seed's code ---

print "config-service: $config_file ok (", length($config), " bytes)\n";
