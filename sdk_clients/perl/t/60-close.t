use strict;
use warnings;
use lib 't/lib';
use Test::More;
use Time::HiRes qw(time);
use Monitoring::SDK;
use TestServer;

delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE)};

subtest 'a sidecar that accepts but never reads' => sub {
    my $srv = TestServer->new(mode => 'stall');
    my $mon = Monitoring::SDK->new(source => 'stalled', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   max_buffer_bytes => 1024 * 1024, on_error => sub { });
    my $payload = 'z' x (64 * 1024);
    my $slowest = 0;
    for (1 .. 400) {    # 25 MiB: more than the kernel's socket buffers hold
        my $t0 = time;
        $mon->log_event('info', $payload);
        my $dt = time - $t0;
        $slowest = $dt if $dt > $slowest;
    }
    cmp_ok($slowest, '<', 0.050, sprintf('calls stay fast (slowest %.1f ms)', $slowest * 1e3));
    my $st = $mon->statistics;
    ok($st->{connected}, 'still connected');
    cmp_ok($st->{queued_bytes}, '<=', 1024 * 1024, 'buffer stays within its byte bound');
    cmp_ok($st->{dropped}{buffer_full} // 0, '>', 0, "oldest dropped and counted ($st->{dropped}{buffer_full})");
    my $t0 = time;
    ok(!$mon->close(0.3), 'close gives up on a sidecar that does not read');
    my $took = time - $t0;
    cmp_ok($took, '>=', 0.25, sprintf('close waited for its timeout (%.2f s)', $took));
    cmp_ok($took, '<', 1.5, 'and no longer');
};

subtest 'program exit flushes (END)' => sub {
    my $srv = TestServer->new;
    local $ENV{MONITORING_SIDECAR} = '127.0.0.1:' . $srv->port;
    is(system(TestServer::perl_cmd('t/bin/child.pl', 'exit-without-close')), 0, 'child exited');
    my $lines = $srv->wait_lines(3, 2);
    is_deeply([map { $_->{msg}{data}{message} } @$lines], [map { "last words $_" } 1 .. 3],
              'messages logged just before exit arrived');
};

subtest 'going out of scope flushes (DESTROY)' => sub {
    my $srv = TestServer->new;
    {
        my $mon = Monitoring::SDK->new(source => 'scoped', tcp_host => '127.0.0.1', tcp_port => $srv->port);
        $mon->log_event('info', "scoped $_") for 1 .. 3;
    }
    my $lines = $srv->wait_lines(3, 2);
    is(scalar @$lines, 3, 'delivered when the object went away');
};

subtest 'close with the sidecar down returns at once' => sub {
    my $srv = TestServer->new;
    $srv->stop;
    my $mon = Monitoring::SDK->new(source => 'gone', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   on_error => sub { });
    $mon->log_event('info', 'lost');
    my $t0 = time;
    $mon->close;
    cmp_ok(time - $t0, '<', 0.5, 'no waiting for the default 2 s');
};

done_testing;
