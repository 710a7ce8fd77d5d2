#!/usr/bin/perl
# Helper run by the tests as a separate process; MONITORING_SIDECAR points it at the test server.
use strict;
use warnings;
use Monitoring::SDK;

my ($mode, @args) = @ARGV;

if ($mode eq 'db-loader') {
    # The seed's db-loader, as a child of a process that has a span and a job_id active.
    my $mon = Monitoring::SDK->new(source => 'db-loader', tcp_host => 'localhost', tcp_port => 17000);
    $mon->log_event('info', 'child started');
    my $span_id = $mon->start_span('load_data');
    $mon->log_event('info', 'Starting DB load', { file => $args[0] });
    $mon->log_metric('rows_loaded', 3, 'count');
    $mon->end_span($span_id, 'success');
    $mon->close;
} elsif ($mode eq 'exit-without-close') {
    my $mon = Monitoring::SDK->new(source => 'exiting');
    $mon->log_event('info', "last words $_") for 1 .. 3;
    exit 0;    # END must flush
} elsif ($mode eq 'sigpipe-default') {
    # Hammer a server that hangs up on every connection, with SIGPIPE at its default action.
    $SIG{PIPE} = 'DEFAULT';
    my $mon = Monitoring::SDK->new(source => 'sigpipe', on_error => sub { });
    for my $i (1 .. 300) {
        $mon->log_event('info', 'x' x 2000);
        $mon->flush(0.01) if $i % 10 == 0;
    }
    print "survived\n";
} else {
    die "unknown mode $mode";
}
