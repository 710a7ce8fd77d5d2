#!/usr/bin/perl
# One client of bench/soak.py: Monitoring::SDK sending a numbered sequence at a steady rate.
# Message seq N carries N in context.seq (events) or tags.seq (metrics), so the soak can find
# each one in every backend. At the end: flush, then one JSON line of counts on stdout.
# Usage: perl -Isdk_clients/perl/lib bench/soak_perl.pl SOURCE HOST PORT PER_SECOND SECONDS
use strict;
use warnings;
use Time::HiRes qw(CLOCK_MONOTONIC clock_gettime sleep);
use Monitoring::SDK;

my ($source, $host, $port, $rate, $seconds) = @ARGV;
die "usage: $0 SOURCE HOST PORT PER_SECOND SECONDS\n" unless defined $seconds;
delete @ENV{qw(MONITORING_SIDECAR MONITORING_SOURCE TRACEPARENT MONITORING_CONTEXT)};

my $mon = Monitoring::SDK->new(source => $source, tcp_host => $host, tcp_port => $port,
                               on_error => sub { });    # a restarting sidecar is expected

# The same mix in every client: mostly info, some warnings, a metric in five, a rare error
# (which the sidecar flushes at once).
sub send_one {
    my ($seq) = @_;
    if ($seq % 5 == 4) {
        $mon->log_metric('soak.seq', $seq, 'count', { seq => $seq });
    } else {
        my $level = $seq % 997 == 0 ? 'error' : $seq % 3 == 0 ? 'warning' : 'info';
        $mon->log_event($level, "soak $source #$seq", { seq => $seq });
    }
}

my $started = clock_gettime(CLOCK_MONOTONIC);
my $called = 0;
while ((my $elapsed = clock_gettime(CLOCK_MONOTONIC) - $started) < $seconds) {
    my $due = int($elapsed * $rate) + 1;
    send_one($called++) while $called < $due;
    sleep 0.005;
}
my $flushed = $mon->flush(30) ? 1 : 0;
my $stats = $mon->statistics;
my $dropped = 0;
$dropped += $_ for values %{ $stats->{dropped} };
print $Monitoring::SDK::JSON_CLASS->new->canonical->encode({
    called => $called, sent => $stats->{sent}, dropped => $dropped, dropped_by_reason => $stats->{dropped},
    reconnects => ($stats->{connects} // 1) - 1, queued => $stats->{queued}, flushed => $flushed,
}), "\n";
$mon->close(1);
