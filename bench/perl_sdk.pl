#!/usr/bin/perl
# Per-call latency of Monitoring::SDK (issue 3): log_event and log_metric with a local
# reader draining the socket ("sidecar up") and with nothing listening ("sidecar down").
# Usage: perl bench/perl_sdk.pl [calls per case, default 20000]
use strict;
use warnings;
use FindBin qw($Bin);
use lib "$Bin/../sdk_clients/perl/lib";
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(CLOCK_MONOTONIC clock_gettime);
use Monitoring::SDK;

my $N = shift // 20_000;
delete @ENV{qw(MONITORING_SIDECAR MONITORING_SOURCE TRACEPARENT MONITORING_CONTEXT)};

# A trivial sidecar: accept and read everything, as fast as it comes.
sub start_drain {
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 16,
                                  ReuseAddr => 1) or die "listen: $!";
    defined(my $pid = fork) or die "fork: $!";
    if (!$pid) {
        while (my $c = $l->accept) {
            1 while sysread $c, my $buf, 1 << 20;
        }
        POSIX::_exit(0);
    }
    my $port = $l->sockport;
    close $l;
    return ($pid, $port);
}

sub free_port {
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1) or die $!;
    return $l->sockport;    # closed again when $l goes away: nothing listens there
}

sub measure {
    my ($mon, $call) = @_;
    $call->($mon, $_) for 1 .. 1000;    # warm up: connect, caches
    my @t;
    $#t = $N - 1;
    for my $i (0 .. $N - 1) {
        my $t0 = clock_gettime(CLOCK_MONOTONIC);
        $call->($mon, $i);
        $t[$i] = (clock_gettime(CLOCK_MONOTONIC) - $t0) * 1e6;
    }
    @t = sort { $a <=> $b } @t;
    return (map { $t[int($_ * ($N - 1))] } 0.50, 0.99), $t[-1];
}

my %calls = (
    log_event  => sub { $_[0]->log_event('info', 'File queued', { file => "/data/in/batch-$_[1].csv" }) },
    log_metric => sub { $_[0]->log_metric('rows_loaded', $_[1], 'count', { table => 'orders' }) },
);

my ($pid, $port) = start_drain();
my @rows;
for my $case (['sidecar up', $port], ['sidecar down', free_port()]) {
    for my $name (sort keys %calls) {
        my $mon = Monitoring::SDK->new(source => 'bench', tcp_host => '127.0.0.1', tcp_port => $case->[1],
                                       on_error => sub { });
        $mon->set_context(job_id => 'job-12345');
        my $span = $mon->start_span('bench');
        push @rows, [$case->[0], $name, measure($mon, $calls{$name})];
        $mon->end_span($span);
        $mon->close(0.5);
    }
}
kill 'KILL', $pid;
waitpid $pid, 0;

printf "Monitoring::SDK %s, %s, perl %vd, %d calls per row\n",
    Monitoring::SDK->VERSION, $Monitoring::SDK::JSON_CLASS, $^V, $N;
printf "%-13s %-11s %9s %9s %9s\n", 'case', 'call', 'p50 us', 'p99 us', 'max us';
printf "%-13s %-11s %9.1f %9.1f %9.1f\n", @$_ for @rows;
