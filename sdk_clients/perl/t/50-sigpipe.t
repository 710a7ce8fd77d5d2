use strict;
use warnings;
use lib 't/lib';
use Test::More;
use Socket qw(SHUT_WR);
use Time::HiRes qw(time);
use Monitoring::SDK;
use TestServer;

delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE)};

subtest 'a write to a broken stream does not raise SIGPIPE' => sub {
    local $SIG{PIPE} = 'DEFAULT';    # what a host program usually has: SIGPIPE kills
    my $srv = TestServer->new;
    my @errors;
    my $mon = Monitoring::SDK->new(source => 'pipe', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   on_error => sub { push @errors, @_ });
    $mon->log_event('info', 'one');
    $mon->flush(2);
    ok($mon->statistics->{connected}, 'connected');
    # White-box: shut our side for writing, so the next send() fails with EPIPE for certain.
    shutdown($mon->{sock}, SHUT_WR);
    $mon->log_event('info', 'two');
    pass('still alive after writing to a shut-down socket');
    is($SIG{PIPE}, 'DEFAULT', "the host's SIGPIPE disposition is untouched");
    like(join('', @errors), qr/Broken pipe/, 'the failure was reported');
    ok($mon->flush(2), 'reconnected and flushed');
    my $lines = $srv->wait_lines(2);
    is_deeply([map { $_->{msg}{data}{message} } @$lines], ['one', 'two'], 'the failed message was resent, once');
};

subtest 'a sidecar that hangs up on every connection' => sub {
    my $srv = TestServer->new(mode => 'close');
    local $ENV{MONITORING_SIDECAR} = '127.0.0.1:' . $srv->port;
    my $t0 = time;
    my $out = qx{@{[ join ' ', map { "'$_'" } TestServer::perl_cmd('t/bin/child.pl', 'sigpipe-default') ]}};
    is($?, 0, 'the child (SIGPIPE at its default action) exited normally');
    is($out, "survived\n", 'and finished its loop');
    cmp_ok(time - $t0, '<', 10, 'in reasonable time');
    cmp_ok($srv->connections, '>=', 1, 'it did connect');
};

done_testing;
