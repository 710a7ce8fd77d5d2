use strict;
use warnings;
use lib 't/lib';
use Test::More;
use JSON::PP ();
use Monitoring::SDK;
use TestServer;

delete @ENV{qw(TRACEPARENT MONITORING_CONTEXT MONITORING_SIDECAR MONITORING_SOURCE)};

my $TS = qr/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/;

# Runs $calls against a fresh server and returns the lines it received.
sub capture {
    my ($calls, %opt) = @_;
    my $srv = TestServer->new;
    my @errors;
    my $mon = Monitoring::SDK->new(source => 'unit', tcp_host => '127.0.0.1', tcp_port => $srv->port,
                                   on_error => sub { push @errors, @_ }, %opt);
    my $n = $calls->($mon);
    ok($mon->flush(2), 'flush delivered everything');
    my $lines = $srv->wait_lines($n);
    is(scalar @$lines, $n, "server received $n lines");
    return ($lines, \@errors, $mon);
}

sub seed_calls {
    my $mon = shift;
    $mon->log_event('info', 'Reading config file', { file => '/etc/app.conf' });
    $mon->log_metric('config_size_kb', 2048 / 1024, 'kilobytes');
    $mon->log_metric('file_valid', 1);
    $mon->log_metric('latency', '12.5', 'ms', { host => 'a', shard => 3 });
    $mon->log_progress('job-12345', '50', 'running');
    $mon->log_resource(12.5, 256, undef, 0.25);
    $mon->log_event('warn', "two\nlines\x01 \"quoted\" caf\x{e9} \x{263a}");
    $mon->log_event('ERROR', 'upper-case level');
    return 8;
}

my ($lines, $errors) = capture(\&seed_calls);
my @msgs = map { $_->{msg} } @$lines;

for my $m (@msgs) {
    like($m->{timestamp}, $TS, "$m->{type}: RFC 3339 UTC timestamp with milliseconds");
    is($m->{source}, 'unit', 'source');
    ok(!exists $m->{$_}, "no $_ without a trace") for qw(trace_id span_id parent_span_id);
    delete $m->{timestamp};
}

is_deeply(\@msgs, [
    { source => 'unit', type => 'event', context => { file => '/etc/app.conf' },
      data => { level => 'info', message => 'Reading config file' } },
    { source => 'unit', type => 'metric', data => { name => 'config_size_kb', value => 2, unit => 'kilobytes' } },
    { source => 'unit', type => 'metric', data => { name => 'file_valid', value => 1 } },
    { source => 'unit', type => 'metric',
      data => { name => 'latency', value => 12.5, unit => 'ms', tags => { host => 'a', shard => '3' } } },
    { source => 'unit', type => 'progress', data => { job_id => 'job-12345', percent => 50, status => 'running' } },
    { source => 'unit', type => 'resource', data => { cpu_percent => 12.5, memory_mb => 256, network_io_mb => 0.25 } },
    { source => 'unit', type => 'event',
      data => { level => 'warning', message => "two\nlines\x01 \"quoted\" caf\x{e9} \x{263a}" } },
    { source => 'unit', type => 'event', data => { level => 'error', message => 'upper-case level' } },
], 'each call produced exactly the expected message') or diag explain \@msgs;

ok(!exists $msgs[$_]{context}, "message $_: no context key when there is none") for 1 .. $#msgs;
my @raw = map { $_->{raw} } @$lines;
like($raw[1], qr/"value":2[,}]/, 'metric value is a bare JSON number');
like($raw[3], qr/"value":12\.5[,}]/, 'a numeric string becomes a number');
like($raw[3], qr/"shard":"3"/, 'tag values are strings');
like($raw[4], qr/"percent":50[,}]/, 'percent is a number');
like($raw[5], qr/"memory_mb":256[,}]/, 'resource values are numbers');
like($raw[6], qr/two\\nlines\\u0001/, 'control characters are escaped by the encoder');
like($raw[0], qr/\A\{"context":.*"type":"event"\}\z/, 'keys are sorted (canonical encoding)');
is_deeply($errors, [], 'no errors');

subtest 'JSON::PP fallback writes the same bytes' => sub {
    local $Monitoring::SDK::JSON_CLASS = 'JSON::PP';
    my ($pp_lines) = capture(\&seed_calls);
    my $strip = sub { (my $r = shift) =~ s/"timestamp":"[^"]+"//; $r };
    is_deeply([map { $strip->($_->{raw}) } @$pp_lines], [map { $strip->($_) } @raw],
              'identical lines apart from the timestamp');
};

subtest 'context: set_context merged with the call context, call wins' => sub {
    my ($ctx_lines, undef, $mon) = capture(sub {
        my $mon = shift;
        $mon->set_context(job_id => 12345);
        $mon->set_context(stage => 'load');
        $mon->log_event('info', 'both', { stage => 'override', file => 'f.csv' });
        $mon->log_metric('m', 1);
        $mon->set_context(stage => undef);
        $mon->log_progress('job-1', 100, 'completed');
        return 3;
    });
    my @m = map { $_->{msg} } @$ctx_lines;
    is_deeply($m[0]{context}, { job_id => '12345', stage => 'override', file => 'f.csv' }, 'call wins');
    is_deeply($m[1]{context}, { job_id => '12345', stage => 'load' }, 'set_context values alone');
    is_deeply($m[2]{context}, { job_id => '12345' }, 'undef removes a key');
    like($ctx_lines->[1]{raw}, qr/"job_id":"12345"/, 'job_id is always a string');
    is($ENV{MONITORING_CONTEXT}, '{"job_id":"12345"}', 'context exported to the environment');
    $mon->set_context(job_id => undef);
    ok(!exists $ENV{MONITORING_CONTEXT}, 'empty context removes MONITORING_CONTEXT');
};

subtest 'bad arguments are reported, never fatal, never warned' => sub {
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, @_ };
    my ($bad_lines, $errs) = capture(sub {
        my $mon = shift;
        $mon->log_metric('not_a_number', 'abc');
        $mon->log_metric('nan', 'NaN');
        $mon->log_metric(undef, undef);
        $mon->log_progress('j', 'half', 'x');
        $mon->end_span('0123456789abcdef', 'ok');
        $mon->log_event(undef, undef, 'not a hash');
        $mon->log_resource('lots', 1);
        return 2;
    });
    is(scalar @$errs, 6, 'six problems reported to on_error') or diag explain $errs;
    is_deeply($bad_lines->[0]{msg}{data}, { level => 'info', message => '' }, 'undef level and message');
    is_deeply($bad_lines->[1]{msg}{data}, { memory_mb => 1 }, 'bad resource value left out');
    is_deeply(\@warnings, [], 'nothing printed');
};

subtest "the host's \$@ and \$! are left alone" => sub {
    my ($lines) = capture(sub {
        my $mon = shift;
        local $@ = 'host error';
        local $! = 2;
        $mon->log_event('info', 'x');
        $mon->log_metric('y', 1);
        is($@, 'host error', '$@ unchanged');
        is($! + 0, 2, '$! unchanged');
        return 2;
    });
};

subtest 'environment overrides win over constructor arguments' => sub {
    my $srv = TestServer->new;
    local $ENV{MONITORING_SIDECAR} = '127.0.0.1:' . $srv->port;
    local $ENV{MONITORING_SOURCE} = 'from-env';
    my $mon = Monitoring::SDK->new(source => 'from-code', tcp_host => 'localhost', tcp_port => 1);
    $mon->log_event('info', 'redirected');
    $mon->close;
    my $got = $srv->wait_lines(1);
    is($got->[0]{msg}{source}, 'from-env', 'MONITORING_SOURCE wins');
    is($got->[0]{msg}{data}{message}, 'redirected', 'MONITORING_SIDECAR wins');
};

done_testing;
