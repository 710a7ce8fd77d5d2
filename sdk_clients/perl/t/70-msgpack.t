use strict;
use warnings;
use lib 't/lib';
use Test::More;
use Monitoring::SDK;
use TestServer;

BEGIN { eval { require Data::MessagePack; 1 } or plan skip_all => 'Data::MessagePack not installed' }

delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE)};

my $srv = TestServer->new(mode => 'raw');
my $mon = Monitoring::SDK->new(source => 'packed', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                               encoding => 'msgpack');
$mon->set_context(job_id => 'job-1');
my $span = $mon->start_span('work');
$mon->log_event('info', "caf\x{e9}", { file => 'a.csv' });
$mon->log_metric('rows', 10, 'count', { table => 't' });
$mon->end_span($span, 'success');
ok($mon->close, 'flushed');

my $bytes = '';
TestServer::wait_until(sub { $bytes = $srv->raw_bytes(1); length $bytes }, 2);
my $first = ord substr($bytes, 0, 1);
ok($first >= 0x80 && $first <= 0x8f, sprintf 'stream starts with a fixmap header (0x%02x)', $first);

my $up = Data::MessagePack::Unpacker->new->utf8;
my ($off, @msgs) = (0);
while ($off < length $bytes) {
    $off = $up->execute($bytes, $off);
    last unless $up->is_finished;
    push @msgs, $up->data;
    $up->reset;
}
is(scalar @msgs, 4, 'four maps, no framing');
delete $_->{timestamp} for @msgs;
my ($trace) = map { $_->{trace_id} } @msgs;
like($trace, qr/\A[0-9a-f]{32}\z/, 'trace id');
is_deeply($msgs[1], { source => 'packed', type => 'event', trace_id => $trace, span_id => $span,
                      context => { job_id => 'job-1', file => 'a.csv' },
                      data => { level => 'info', message => "caf\x{e9}" } }, 'event, same keys as JSON');
is_deeply($msgs[2]{data}, { name => 'rows', value => 10, unit => 'count', tags => { table => 't' } }, 'metric');
like($bytes, qr/\xa5value\x0a/, 'value packed as an integer, not a string');
is($msgs[3]{data}{status}, 'success', 'span end');

done_testing;
