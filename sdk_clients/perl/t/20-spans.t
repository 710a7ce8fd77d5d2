use strict;
use warnings;
use lib 't/lib';
use Test::More;
use JSON::PP qw(decode_json);
use Monitoring::SDK;
use TestServer;

delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE)};

my $srv = TestServer->new;
my @errors;
sub sdk {
    Monitoring::SDK->new(source => shift // 'spans', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                         on_error => sub { push @errors, @_ }, @_);
}
my $seen = 0;
sub received {    # the messages that arrived since the last call
    my $lines = $srv->wait_lines($seen + shift);
    my @new = map { $_->{msg} } @$lines[$seen .. $#$lines];
    $seen = @$lines;
    return @new;
}

subtest 'nested spans' => sub {
    my $mon = sdk();
    my $outer = $mon->start_span('outer');
    like($outer, qr/\A[0-9a-f]{16}\z/, 'span id is 16 lowercase hex');
    my ($trace) = ($ENV{TRACEPARENT} // '') =~ /\A00-([0-9a-f]{32})-\Q$outer\E-01\z/;
    ok($trace, 'TRACEPARENT exported for the outer span');
    $mon->log_event('info', 'in outer');
    my $inner = $mon->start_span('inner');
    is($ENV{TRACEPARENT}, "00-$trace-$inner-01", 'TRACEPARENT follows the innermost span');
    $mon->log_metric('in_inner', 1);
    $mon->end_span($inner, 'success');
    is($ENV{TRACEPARENT}, "00-$trace-$outer-01", 'back to the outer span');
    $mon->log_event('info', 'outer again');
    $mon->end_span($outer);
    ok(!exists $ENV{TRACEPARENT}, 'TRACEPARENT removed when no span is active');
    $mon->log_event('info', 'no trace');
    $mon->flush(2);

    my @m = received(8);
    is_deeply([map { [@$_{qw(type trace_id span_id parent_span_id)}] } @m], [
        ['span',   $trace, $outer, undef],
        ['event',  $trace, $outer, undef],
        ['span',   $trace, $inner, $outer],
        ['metric', $trace, $inner, undef],
        ['span',   $trace, $inner, $outer],
        ['event',  $trace, $outer, undef],
        ['span',   $trace, $outer, undef],
        ['event',  undef,  undef,  undef],
    ], 'trace_id, span_id and parent_span_id of every message');
    ok(!exists $m[7]{$_}, "no $_ key outside a trace") for qw(trace_id span_id parent_span_id);
    ok(!exists $m[0]{parent_span_id}, 'a root span has no parent_span_id key');
    is_deeply($m[0]{data}, { name => 'outer', phase => 'start' }, 'span start data');
    my $end = $m[4]{data};
    is_deeply([@$end{qw(name phase status)}], ['inner', 'end', 'success'], 'span end data');
    ok($end->{duration_ms} >= 0 && $end->{duration_ms} < 5000, "duration_ms is a sane number ($end->{duration_ms})");
    is($m[6]{data}{status}, 'success', 'status defaults to success');

    my $again = $mon->start_span('second root');
    my ($trace2) = $ENV{TRACEPARENT} =~ /\A00-([0-9a-f]{32})-/;
    isnt($trace2, $trace, 'a new root span starts a new trace');
    $mon->end_span($again);
    received(2);
};

subtest 'propagation through a real child process' => sub {
    my $mon = sdk('queue-service');
    my $span = $mon->start_span('process_job');
    $mon->set_context('job_id', 'job-12345');
    my ($trace) = $ENV{TRACEPARENT} =~ /\A00-([0-9a-f]{32})-/;
    local $ENV{MONITORING_SIDECAR} = '127.0.0.1:' . $srv->port;
    is(system(TestServer::perl_cmd('t/bin/child.pl', 'db-loader', '/data/in.csv')), 0, 'child ran');
    $mon->end_span($span, 'success');
    $mon->set_context('job_id', undef);
    $mon->flush(2);

    my @m = received(7);
    my @child = grep { $_->{source} eq 'db-loader' } @m;
    is(scalar @child, 5, 'five messages from the child');
    is_deeply([map { $_->{trace_id} } @child], [($trace) x 5], 'the child joined the trace');
    is_deeply([map { $_->{context}{job_id} } @child], [('job-12345') x 5], 'and the job');
    is($child[0]{span_id}, $span, 'before its own span, the child reports under the remote parent');
    my $load = $child[1];
    is($load->{data}{name}, 'load_data', 'child span');
    is($load->{parent_span_id}, $span, "the child's span is a child of process_job");
    is($child[2]{span_id}, $load->{span_id}, 'child messages carry the innermost span');
    is_deeply($child[2]{context}, { job_id => 'job-12345', file => '/data/in.csv' }, 'context merged in the child');
};

subtest 'TRACEPARENT and MONITORING_CONTEXT read at init' => sub {
    my ($t, $p) = ('ab' x 16, 'cd' x 8);
    local $ENV{TRACEPARENT} = "00-$t-$p-01";
    local $ENV{MONITORING_CONTEXT} = '{"job_id":"job-7","tenant":"acme"}';
    my $mon = sdk();
    $mon->log_event('info', 'remote');
    my $s = $mon->start_span('local');
    $mon->end_span($s);
    is($ENV{TRACEPARENT}, "00-$t-$p-01", 'the inherited TRACEPARENT is restored after the span');
    $mon->flush(2);
    my @m = received(3);
    is_deeply([@{ $m[0] }{qw(trace_id span_id)}], [$t, $p], 'messages carry the remote trace and parent');
    ok(!exists $m[0]{parent_span_id}, 'no parent_span_id on a non-span message');
    is_deeply([@{ $m[1] }{qw(trace_id parent_span_id)}], [$t, $p], 'a local span is a child of the remote one');
    is_deeply($m[0]{context}, { job_id => 'job-7', tenant => 'acme' }, 'context seeded from the environment');
};

subtest 'a root span adopts propagation a consumer restored into %ENV' => sub {
    my $mon = sdk();
    my ($t, $p) = ('12' x 16, '34' x 8);
    local $ENV{TRACEPARENT} = "00-$t-$p-01";
    local $ENV{MONITORING_CONTEXT} = '{"job_id":"job-9"}';
    my $s = $mon->start_span('process_job');
    $mon->end_span($s);
    $mon->log_metric('jobs_processed', 1, 'count');
    $mon->flush(2);
    my @m = received(3);
    is_deeply([@{ $m[0] }{qw(trace_id parent_span_id)}], [$t, $p], 'span joined the restored trace');
    is($m[0]{context}{job_id}, 'job-9', 'and the restored context');
    is_deeply([@{ $m[2] }{qw(trace_id span_id)}], [$t, $p], 'after the span, messages stay in that trace');
};

subtest 'invalid inbound values are ignored' => sub {
    @errors = ();
    for my $tp ('00-' . ('0' x 32) . '-' . ('cd' x 8) . '-01', 'ff-' . ('ab' x 16) . '-' . ('cd' x 8) . '-01',
                'garbage', '00-' . ('ab' x 16) . '-' . ('0' x 16) . '-01') {
        local $ENV{TRACEPARENT} = $tp;
        local $ENV{MONITORING_CONTEXT} = '[1,2]';
        my $mon = sdk();
        $mon->log_event('info', 'x');
        $mon->flush(2);
        my ($m) = received(1);
        ok(!exists $m->{trace_id} && !exists $m->{context}, "ignored: $tp");
    }
    is(scalar @errors, 4, 'each bad MONITORING_CONTEXT reported');
};

subtest 'context set inside a root span ends with it' => sub {
    # The seed's queue-service loop, with a queue that carries nothing but the job.
    my $mon = sdk('queue-service');
    for my $job ('job-1', 'job-2') {
        my $span_id = $mon->start_span('process_job');
        $mon->set_context('job_id', $job);
        $mon->log_progress($job, 0, 'started');
        is_deeply(decode_json($ENV{MONITORING_CONTEXT}), { job_id => $job }, "$job exported to children");
        my $inner = $mon->start_span('load');
        $mon->set_context('stage', 'load');    # a nested span does not scope it
        $mon->end_span($inner);
        $mon->log_event('info', 'after load');
        $mon->end_span($span_id, 'success');
        ok(!exists $ENV{MONITORING_CONTEXT}, "$job: MONITORING_CONTEXT unset again");
        $mon->log_metric('jobs_processed', 1, 'count');
    }
    $mon->flush(2);
    my @m = received(14);
    my @seen = map { [$_->{type}, ($_->{data}{name} // $_->{data}{message} // ''), $_->{context}] } @m;
    is_deeply(\@seen, [
        map {(
            ['span', 'process_job', undef],
            ['progress', '', { job_id => $_ }],
            ['span', 'load', { job_id => $_ }],
            ['span', 'load', { job_id => $_, stage => 'load' }],
            ['event', 'after load', { job_id => $_, stage => 'load' }],
            ['span', 'process_job', { job_id => $_, stage => 'load' }],
            ['metric', 'jobs_processed', undef],
        )} 'job-1', 'job-2'
    ], "no message of job-2 carries job-1's job_id");
    isnt($m[0]{trace_id}, $m[7]{trace_id}, 'each job has a trace of its own');

    # Keys changed or removed inside come back; an out-of-order end restores at the root's end.
    $mon->set_context('tenant', 'acme');
    my $root = $mon->start_span('root');
    my $child = $mon->start_span('child');
    $mon->set_context('tenant', undef);
    $mon->set_context('job_id', 'job-3');
    $mon->end_span($root);
    is_deeply(decode_json($ENV{MONITORING_CONTEXT}), { tenant => 'acme' }, 'restored when the root ends, before the child');
    $mon->end_span($child);
    $mon->log_event('info', 'after both');
    $mon->flush(2);
    my @rest = received(5);
    is_deeply([map { [$_->{data}{name} // $_->{data}{message}, $_->{context}] } @rest], [
        ['root', { tenant => 'acme' }],
        ['child', { tenant => 'acme' }],
        ['root', { job_id => 'job-3' }],          # the end message still has the span's context
        ['child', { tenant => 'acme' }],
        ['after both', { tenant => 'acme' }],
    ], 'the context of before the root span, from the root end on');
    $mon->end_span($root);                        # already ended: nothing sent, nothing restored
    is_deeply(decode_json($ENV{MONITORING_CONTEXT}), { tenant => 'acme' }, 'a second end_span restores nothing');
    $mon->set_context('tenant', undef);
};

subtest 'an inherited key changed inside a root span comes back' => sub {
    local $ENV{MONITORING_CONTEXT} = '{"job_id":"job-parent","tenant":"acme"}';
    my $mon = sdk('db-loader');
    my $span = $mon->start_span('load_data');
    $mon->set_context('job_id', 'job-child');
    $mon->set_context('file', 'a.csv');
    $mon->end_span($span);
    is_deeply(decode_json($ENV{MONITORING_CONTEXT}), { job_id => 'job-parent', tenant => 'acme' },
              'MONITORING_CONTEXT back to the inherited value');
    $mon->set_context('region', 'eu');            # no span open: it lasts
    my $next = $mon->start_span('load_data');
    $mon->end_span($next);
    $mon->log_event('info', 'after');
    $mon->flush(2);
    my @m = received(5);
    is_deeply($m[1]{context}, { job_id => 'job-child', tenant => 'acme', file => 'a.csv' }, 'end message sent before the restore');
    is_deeply($m[4]{context}, { job_id => 'job-parent', tenant => 'acme', region => 'eu' },
              'context set with no span open survives a root span');
};

subtest 'span ids are unique' => sub {
    my $mon = sdk(undef, on_error => sub { });
    my %ids;
    for (1 .. 200) { my $id = $mon->start_span('s'); $ids{$id}++; $mon->end_span($id) }
    is(scalar keys %ids, 200, '200 distinct span ids');
    $mon->flush(2);
    received(400);
};

done_testing;
