use strict;
use warnings;
use lib 't/lib';
use Test::More;
use Monitoring::SDK;
use TestServer;

delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE)};

my $srv = TestServer->new;
$srv->stop;    # down while the parent buffers, so the buffer is not empty at fork time
my $mon = Monitoring::SDK->new(source => 'forky', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                               on_error => sub { });
$mon->log_event('info', 'before fork');
my $span = $mon->start_span('parent work');
$srv->start;

defined(my $pid = fork) or die "fork: $!";
if (!$pid) {
    $mon->log_event('info', 'from child');
    my $child_span = $mon->start_span('child work');
    $mon->end_span($child_span);
    exit 0;    # END flushes the child's own buffer
}
waitpid $pid, 0;
is($?, 0, 'child exited cleanly');
$mon->log_event('info', 'from parent');
$mon->end_span($span);
ok($mon->flush(2), 'parent flushed');

my $lines = $srv->wait_lines(7);
my %by_text;
push @{ $by_text{ $_->{msg}{data}{message} // "$_->{msg}{data}{name}/$_->{msg}{data}{phase}" } }, $_ for @$lines;
is(scalar @$lines, 7, 'seven messages in total') or diag explain [map { $_->{raw} } @$lines];
is(scalar @{ $by_text{'before fork'} }, 1, "the parent's buffer was not resent by the child");
is(scalar @{ $by_text{'from child'} }, 1, "the child's message arrived once");
my $child_conn = $by_text{'from child'}[0]{conn};
my $parent_conn = $by_text{'before fork'}[0]{conn};
isnt($child_conn, $parent_conn, 'the child used its own connection');
is($by_text{'from parent'}[0]{conn}, $parent_conn, 'the parent kept its stream');
is($by_text{'child work/start'}[0]{conn}, $child_conn, 'child span on the child connection');
is($by_text{'from child'}[0]{msg}{span_id}, $span, 'the child stays inside the parent span');
is($by_text{'child work/start'}[0]{msg}{parent_span_id}, $span, 'its own span is a child of it');

done_testing;
