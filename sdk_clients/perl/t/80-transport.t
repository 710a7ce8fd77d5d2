use strict;
use warnings;
use lib 't/lib';
use Test::More;
use File::Temp qw(tempdir);
use JSON::PP ();
use Time::HiRes qw(time);
use Monitoring::SDK;
use TestServer;

# A Unix socket in place of host and port, and the ingest token sent first on every connection.
delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE MONITORING_SIDECAR_TOKEN)};
my $dir = tempdir(CLEANUP => 1);
my $JSON = JSON::PP->new->utf8;

subtest 'a Unix socket, by option or by MONITORING_SIDECAR=unix:PATH' => sub {
    my $path = "$dir/by-option.sock";
    my $srv = TestServer->new(unix => $path);
    my $mon = Monitoring::SDK->new(source => 'unix', unix_socket => $path, tcp_host => '10.255.255.1', tcp_port => 1);
    $mon->log_event('info', 'by option');
    ok($mon->close(5), 'delivered');
    local $ENV{MONITORING_SIDECAR} = "unix:$path";
    $mon = Monitoring::SDK->new(source => 'unix', tcp_host => '10.255.255.1', tcp_port => 1);
    $mon->log_event('info', 'by MONITORING_SIDECAR');
    ok($mon->close(5), 'delivered: the variable wins over tcp_host and tcp_port');
    my $lines = $srv->wait_lines(2);
    is_deeply([map { $_->{msg}{data}{message} } @$lines], ['by option', 'by MONITORING_SIDECAR'], 'both arrived');
    is_deeply([map { $_->{conn} } @$lines], [1, 2], 'over two connections');
};

subtest 'no socket yet: calls return at once, one warning, then everything arrives in order' => sub {
    my $path = "$dir/later.sock";
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, @_ };
    my $mon = Monitoring::SDK->new(source => 'later', unix_socket => $path);
    my $slowest = 0;
    for my $i (1 .. 200) {
        my $t0 = time;
        $mon->log_event('info', "m$i");
        my $dt = time - $t0;
        $slowest = $dt if $dt > $slowest;
    }
    cmp_ok($slowest, '<', 0.050, sprintf('slowest call took %.1f us', $slowest * 1e6));
    is(scalar @warnings, 1, 'one warning');
    like($warnings[0] // '', qr{connect to unix:\Q$path\E: No such file or directory}, 'naming the socket');
    my $srv = TestServer->new(unix => $path);
    ok($mon->flush(5), 'flushed once the sidecar listens');
    my $lines = $srv->wait_lines(200);
    is_deeply([map { $_->{msg}{data}{message} } @$lines], [map { "m$_" } 1 .. 200], 'all, in order');
    $mon->close;
};

subtest 'the token goes first on every connection, and MONITORING_SIDECAR_TOKEN wins' => sub {
    my $path = "$dir/token.sock";
    my $srv = TestServer->new(unix => $path);
    local $ENV{MONITORING_SIDECAR_TOKEN} = 'from "the" environment';
    my $mon = Monitoring::SDK->new(source => 'token', unix_socket => $path, token => 'from the option',
                                   on_error => sub { });
    $mon->log_event('info', 'one');
    $mon->flush(5);
    $srv->wait_lines(2);
    $srv->stop;
    $srv->start;    # the sidecar restarts: the next connection authenticates again
    my $ok = TestServer::wait_until(sub { $mon->log_event('info', 'again'); $srv->connections >= 2 }, 5);
    ok($ok, 'reconnected');
    $mon->close(5);
    my $lines = $srv->wait_lines(4);
    my %first;
    for my $line (@$lines) { $first{ $line->{conn} } //= $line->{msg} }
    is_deeply([map { $first{$_} } sort keys %first], [({ auth => 'from "the" environment' }) x 2],
              'each connection begins with the auth line');
    is(scalar(grep { exists $_->{msg}{auth} } @$lines), 2, 'and only there');
    is($lines->[1]{msg}{data}{message}, 'one', 'the messages follow it');
};

subtest 'with MessagePack the auth message is a map' => sub {
    plan skip_all => 'Data::MessagePack is not installed' unless eval { require Data::MessagePack; 1 };
    my $srv = TestServer->new(mode => 'raw');
    my $mon = Monitoring::SDK->new(source => 'packed', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   encoding => 'msgpack', token => 'tcp too');
    $mon->log_event('info', 'packed');
    ok($mon->close(5), 'delivered');
    TestServer::wait_until(sub { length $srv->raw_bytes(1) }, 5);
    my $up = Data::MessagePack::Unpacker->new->utf8;
    my $bytes = $srv->raw_bytes(1);
    my @values;
    my $offset = 0;
    while ($offset < length $bytes) {
        $offset = $up->execute($bytes, $offset);
        last unless $up->is_finished;
        push @values, $up->data;
        $up->reset;
    }
    is_deeply($values[0], { auth => 'tcp too' }, 'the auth map first');
    is($values[1]{data}{message}, 'packed', 'then the message');
};

done_testing;
