use strict;
use warnings;
use lib 't/lib';
use Test::More;
use Time::HiRes qw(sleep time);
use Monitoring::SDK;
use TestServer;

delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE)};

# A port that nothing listens on: start a server, note its port, stop it.
sub down_server { my $srv = TestServer->new(@_); $srv->stop; return $srv }

subtest 'sidecar down: calls return at once and warn once' => sub {
    my $srv = down_server();
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, @_ };
    my $mon = Monitoring::SDK->new(source => 'down', tcp_host => '127.0.0.1', tcp_port => $srv->port);
    my $slowest = 0;
    my $t_end = time + 0.5;    # long enough to cross several reconnect attempts (0.1, 0.2 s)
    my $calls = 0;
    while (time < $t_end) {
        my $t0 = time;
        $mon->log_event('info', "call $calls", { n => $calls });
        $mon->log_metric('m', $calls);
        my $dt = time - $t0;
        $slowest = $dt if $dt > $slowest;
        $calls++;
        sleep 0.002;
    }
    cmp_ok($slowest, '<', 0.050, sprintf('slowest pair of calls took %.1f us', $slowest * 1e6));
    is(scalar @warnings, 1, 'exactly one warning') or diag explain \@warnings;
    like($warnings[0] // '', qr/Monitoring::SDK\(down\): connect to 127\.0\.0\.1:\d+: Connection refused/,
         'the warning says what is wrong');
    my $st = $mon->statistics;
    cmp_ok($st->{errors}, '>=', 3, "further failures counted ($st->{errors})");
    is($st->{queued}, 2 * $calls, 'everything is buffered');
    my $t0 = time;
    ok(!$mon->close, 'close reports undelivered messages');
    cmp_ok(time - $t0, '<', 0.5, 'close does not wait for a sidecar that refuses');
    is($mon->statistics->{dropped}{unsent_at_close}, 2 * $calls, 'counted as unsent at close');
};

subtest 'bounded buffer drops oldest, counts, reports once connected' => sub {
    my $srv = down_server();
    my @errors;
    my $mon = Monitoring::SDK->new(source => 'bounded', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   max_buffer_messages => 5, on_error => sub { push @errors, @_ });
    $mon->log_event('info', "m$_") for 1 .. 12;
    is(scalar(grep { /dropping/ } @errors), 1, 'the drop episode is reported to on_error once');
    my $st = $mon->statistics;
    is($st->{queued}, 5, 'five messages kept');
    is_deeply($st->{dropped}, { buffer_full => 7 }, 'seven dropped, counted');

    $srv->start;
    ok($mon->flush(2), 'flush after the sidecar came back');
    $mon->log_event('info', 'm13');
    $mon->flush(2);
    my $lines = $srv->wait_lines(7);
    my @m = map { $_->{msg} } @$lines;
    is_deeply($m[0]{data}, { name => 'sdk.dropped_messages', value => 7, unit => 'count',
                             tags => { reason => 'buffer_full' } }, 'drop report comes first');
    is($m[0]{type}, 'metric', 'as a metric');
    like($lines->[0]{raw}, qr/"value":7[,}]/, 'drop count is a number');
    is_deeply([map { $_->{data}{message} } @m[1 .. $#m]], [map { "m$_" } 8 .. 13], 'the newest survived, in order');
    is(scalar @$lines, 7, 'nothing else, nothing twice');
    is_deeply($mon->statistics->{dropped}, { buffer_full => 7 }, 'the report is not a drop');
};

subtest 'a __WARN__ handler that dies cannot make the SDK die' => sub {
    my $srv = down_server();
    local $SIG{__WARN__} = sub { die "warnings are fatal here: @_" };
    my $mon = Monitoring::SDK->new(source => 'strict-host', tcp_host => '127.0.0.1', tcp_port => $srv->port);
    ok(eval { $mon->log_event('info', 'x') for 1 .. 3; $mon->close; 1 }, 'no exception reached the host')
        or diag $@;
};

subtest 'byte bound and oversize messages' => sub {
    my $srv = down_server();
    my $mon = Monitoring::SDK->new(source => 'bytes', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   max_buffer_bytes => 2000, max_message_bytes => 1500, on_error => sub { });
    $mon->log_event('info', 'x' x 400) for 1 .. 20;
    $mon->log_event('info', 'y' x 1600);
    my $st = $mon->statistics;
    cmp_ok($st->{queued_bytes}, '<=', 2000, "buffer holds at most 2000 bytes ($st->{queued_bytes})");
    my $size = $st->{queued_bytes} / $st->{queued};
    is($st->{queued}, int(2000 / $size), "as many $size-byte messages as fit");
    is_deeply($st->{dropped}, { buffer_full => 20 - $st->{queued}, too_large => 1 }, 'drops by reason');
};

subtest 'sidecar restart: reconnect by itself, nothing lost or duplicated' => sub {
    my $srv = TestServer->new;
    my $mon = Monitoring::SDK->new(source => 'restart', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   on_error => sub { });
    my $i = 0;
    $mon->log_event('info', 'r' . ++$i) for 1 .. 5;
    $mon->flush(2);
    is(scalar @{ $srv->wait_lines(5) }, 5, 'first five delivered');

    $srv->stop;
    $mon->log_event('info', 'r' . ++$i) for 1 .. 5;
    ok(!$mon->statistics->{connected}, 'the SDK noticed the sidecar went away');
    $srv->start;
    # Ordinary calls only: the SDK reconnects when its backoff allows.
    my $ok = TestServer::wait_until(sub {
        $mon->log_event('info', 'r' . ++$i);
        grep { $_->{conn} == 2 } @{ $srv->lines };
    }, 5);
    ok($ok, "reconnected after $i calls");
    $mon->close;
    my $lines = $srv->wait_lines($i);
    is_deeply([map { $_->{msg}{data}{message} } @$lines], [map { "r$_" } 1 .. $i],
              "all $i messages arrived once, in order");
    is_deeply([map { $_->{conn} } @$lines], [(1) x 5, (2) x ($i - 5)], 'over two connections');
    is_deeply($mon->statistics->{dropped}, {}, 'no drops');
};

done_testing;
