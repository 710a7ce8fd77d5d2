package Monitoring::SDK;

use 5.014;
use strict;
use warnings;

our $VERSION = '0.1.0';

use Errno qw(EAGAIN EINPROGRESS EINTR EWOULDBLOCK);
use IO::Handle ();
use IO::Socket::UNIX ();
use List::Util qw(min);
use Scalar::Util qw(looks_like_number refaddr weaken);
use Socket qw(AF_INET SOCK_STREAM SOL_SOCKET SO_ERROR getaddrinfo pack_sockaddr_un);
use Time::HiRes ();

# The JSON encoder is chosen once; tests may set this before new() to exercise the fallback.
our $JSON_CLASS = eval { require Cpanel::JSON::XS; 'Cpanel::JSON::XS' }
    || do { require JSON::PP; 'JSON::PP' };

# MSG_NOSIGNAL keeps a write to a dead peer from raising SIGPIPE without touching %SIG;
# where the platform lacks it, the write localises $SIG{PIPE} instead.
my $NOSIGNAL = eval { Socket::MSG_NOSIGNAL() } // 0;

my %LEVEL = (
    (map { $_ => $_ } qw(debug info warning error critical)),
    warn => 'warning', err => 'error', crit => 'critical', fatal => 'critical',
);
my %DEFAULTS = (
    source              => undef,
    tcp_host            => 'localhost',
    tcp_port            => 17000,
    unix_socket         => undef,
    token               => undef,
    encoding            => 'json',
    max_buffer_messages => 10_000,
    max_buffer_bytes    => 8 * 1024 * 1024,
    max_message_bytes   => 1024 * 1024,
    flush_timeout       => 2,
    connect_timeout     => 5,
    on_error            => undef,
);
my ($BACKOFF_MIN, $BACKOFF_MAX) = (0.1, 30);
my $CHUNK = 64 * 1024;    # bytes handed to one send() when a backlog is drained
my $TRACEPARENT_RE = qr/\A([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}\z/;

my %LIVE;                 # refaddr => weak ref; END flushes whatever is still alive

sub new {
    my ($class, %arg) = @_;
    my $self = bless {
        %DEFAULTS,
        pid => $$, queue => [], qbytes => 0, head_off => 0, report_at_head => undef,
        state => 'down', sock => undef, preamble => '', next_try => 0, backoff => $BACKOFF_MIN, addr_i => 0,
        spans => [], context => {}, ctx_seen => '', remote => undef, tp_outer => undef,
        pending_drops => {}, closed => 0, warned => 0,
        stats => { sent => 0, connects => 0, errors => 0, dropped => {} },
    }, $class;
    my @unknown = grep { !exists $DEFAULTS{$_} } sort keys %arg;
    $self->{$_} = $arg{$_} for grep { exists $DEFAULTS{$_} } keys %arg;

    # The environment wins, so programs that hard-code localhost:17000 can be redirected.
    $self->{source} = $ENV{MONITORING_SOURCE} if length($ENV{MONITORING_SOURCE} // '');
    $self->{source} //= ($0 =~ m{([^/]+)\z})[0] // 'perl';
    $self->{source} = "$self->{source}";
    if (length(my $hp = $ENV{MONITORING_SIDECAR} // '')) {
        if ($hp =~ /\Aunix:(.+)\z/s) { $self->{unix_socket} = $1 }
        elsif ($hp =~ /\A\[?([^\[\]]+?)\]?:(\d+)\z/) { @$self{qw(tcp_host tcp_port unix_socket)} = ($1, $2, undef) }
        else { $self->_error("ignoring MONITORING_SIDECAR='$hp': expected host:port or unix:/path") }
    }
    $self->{token} = $ENV{MONITORING_SIDECAR_TOKEN} if length($ENV{MONITORING_SIDECAR_TOKEN} // '');
    $self->{where} = length($self->{unix_socket} // '') ? "unix:$self->{unix_socket}"
                                                        : "$self->{tcp_host}:$self->{tcp_port}";
    $self->_error("unknown option(s) ignored: @unknown") if @unknown;

    $self->{json} = $JSON_CLASS->new->utf8->canonical->allow_nonref->allow_blessed->allow_unknown;
    if ($self->{encoding} eq 'msgpack' && eval { require Data::MessagePack; 1 }) {
        $self->{msgpack} = Data::MessagePack->new->canonical->utf8;
    } else {
        $self->_error("encoding '$self->{encoding}' unavailable, using json") if $self->{encoding} ne 'json';
        $self->{encoding} = 'json';
    }
    # The auth message, sent first on every connection; the token is never in a message or an error.
    if (length(my $token = $self->{token} // '')) {
        utf8::decode($token) unless utf8::is_utf8($token);    # %ENV holds bytes
        $self->{auth} = $self->_encode({ auth => $token });
    }
    $self->_inbound;
    weaken($LIVE{ refaddr $self } = $self);
    return $self;
}

# Public methods run inside eval with $@ and $! preserved: instrumentation must never take
# down, or disturb the error state of, the program it observes.
for my $name (qw(log_event log_metric log_progress log_resource start_span end_span
                 set_context flush close)) {
    my $impl = __PACKAGE__->can("_$name");
    my $wrapper = sub {
        my $self = shift;
        local ($@, $!);
        my $ret;
        eval {
            $self->_after_fork if $self->{pid} != $$;
            $ret = $self->$impl(@_);
            1;
        } or $self->_error("internal error in $name: $@");
        return $ret;
    };
    no strict 'refs';
    *{$name} = $wrapper;
}

sub _log_event {
    my ($self, $level, $message, $context) = @_;
    $level = lc($level // 'info');
    $self->_emit(event => { level => $LEVEL{$level} // $level, message => '' . ($message // '') },
                 $context);
}

sub _log_metric {
    my ($self, $name, $value, $unit, $tags) = @_;
    $name //= '';
    my $v = _num($value);
    return $self->_error("log_metric('$name'): value is not a finite number") unless defined $v;
    my %data = (name => "$name", value => $v);
    $data{unit} = "$unit" if defined $unit;
    $data{tags} = { map { $_ => '' . ($tags->{$_} // '') } keys %$tags }
        if ref $tags eq 'HASH' && %$tags;
    $self->_emit(metric => \%data);
}

sub _log_progress {
    my ($self, $job_id, $percent, $status) = @_;
    my $p = _num($percent);
    return $self->_error('log_progress: percent is not a finite number') unless defined $p;
    $self->_emit(progress =>
        { job_id => '' . ($job_id // ''), percent => $p, status => '' . ($status // 'running') });
}

sub _log_resource {
    my ($self, @values) = @_;
    my @keys = qw(cpu_percent memory_mb disk_io_mb network_io_mb);
    my %data;
    for my $i (0 .. $#keys) {
        next unless defined $values[$i];
        my $n = _num($values[$i]);
        if (defined $n) { $data{ $keys[$i] } = $n }
        else { $self->_error("log_resource: $keys[$i] is not a finite number") }
    }
    $self->_emit(resource => \%data);
}

sub _start_span {
    my ($self, $name) = @_;
    my $stack = $self->{spans};
    my ($trace, $parent);
    if (@$stack) {
        ($trace, $parent) = @{ $stack->[-1] }{qw(trace id)};
    } else {
        $self->_inbound;
        ($trace, $parent) = @{ $self->{remote} || [] };
        $trace //= _random_hex(16);
    }
    my $span = { id => _random_hex(8), trace => $trace, parent => $parent,
                 name => '' . ($name // ''), t0 => Time::HiRes::time() };
    # A root span owns the context set while it is open: it is undone when the span ends.
    $span->{context_before} = { %{ $self->{context} } } unless @$stack;
    push @$stack, $span;
    $self->_export_trace;
    $self->_emit(span => { name => $span->{name}, phase => 'start' }, undef, $span);
    return $span->{id};
}

sub _end_span {
    my ($self, $id, $status) = @_;
    my $stack = $self->{spans};
    my ($i) = grep { $stack->[$_]{id} eq ($id // '') } reverse 0 .. $#$stack;
    return $self->_error('end_span: no active span with id ' . ($id // 'undef')) unless defined $i;
    my ($span) = splice @$stack, $i, 1;
    $self->_export_trace;
    my $ms = sprintf '%.3f', (Time::HiRes::time() - $span->{t0}) * 1000;
    my $sent = eval {
        $self->_emit(span => { name => $span->{name}, phase => 'end', status => '' . ($status // 'success'),
                               duration_ms => 0 + $ms }, undef, $span);
        1;
    };
    my $error = $@;
    if (my $before = $span->{context_before}) {    # restored even if the end message failed
        $self->{context} = $before;
        $self->_export_context;
    }
    die $error unless $sent;
    return;
}

sub _set_context {
    my ($self, $key, $value) = @_;
    return unless defined $key;
    if (defined $value) { $self->{context}{$key} = $key eq 'job_id' ? "$value" : $value }
    else { delete $self->{context}{$key} }
    $self->_export_context;
    return;
}

sub _export_context {
    my $self = shift;
    if (%{ $self->{context} }) {
        $ENV{MONITORING_CONTEXT} = $self->{ctx_seen} = $self->{json}->encode($self->{context});
    } else {
        delete $ENV{MONITORING_CONTEXT};
        $self->{ctx_seen} = '';
    }
    return;
}

# Inbound propagation: read at new() and again whenever a root span starts, so a consumer
# that restores a producer's TRACEPARENT/MONITORING_CONTEXT (e.g. from a queue entry) joins it.
sub _inbound {
    my $self = shift;
    my $tp = $ENV{TRACEPARENT};
    $self->{tp_outer} = $tp;
    my ($version, $trace, $span) = lc($tp // '') =~ $TRACEPARENT_RE;
    $self->{remote} = defined $version && $version ne 'ff' && $trace =~ /[1-9a-f]/
        && $span =~ /[1-9a-f]/ ? [$trace, $span] : undef;
    my $ctx = $ENV{MONITORING_CONTEXT} // '';
    return if $ctx eq $self->{ctx_seen};
    $self->{ctx_seen} = $ctx;
    my $h = length $ctx ? eval { $self->{json}->decode($ctx) } : {};
    if (ref $h eq 'HASH') { $self->{context} = $h }
    else { $self->_error('ignoring MONITORING_CONTEXT: not a JSON object') }
}

sub _export_trace {
    my $self = shift;
    if (my $top = $self->{spans}[-1]) { $ENV{TRACEPARENT} = "00-$top->{trace}-$top->{id}-01" }
    elsif (defined $self->{tp_outer}) { $ENV{TRACEPARENT} = $self->{tp_outer} }
    else { delete $ENV{TRACEPARENT} }
}

sub _emit {
    my ($self, $type, $data, $call_context, $span) = @_;
    my %msg = (source => $self->{source}, type => $type, timestamp => _timestamp(), data => $data);
    if ($span) {
        @msg{qw(trace_id span_id)} = @$span{qw(trace id)};
        $msg{parent_span_id} = $span->{parent} if defined $span->{parent};
    } elsif (my $top = $self->{spans}[-1] // $self->{remote}) {
        @msg{qw(trace_id span_id)} = ref $top eq 'HASH' ? @$top{qw(trace id)} : @$top;
    }
    my $ctx = $self->{context};
    $ctx = { %$ctx, %$call_context } if ref $call_context eq 'HASH' && %$call_context;
    $msg{context} = $ctx if %$ctx;
    $self->{closed} = 0;
    $self->_enqueue($self->{msgpack} ? $self->_pack(\%msg) : $self->{json}->encode(\%msg) . "\n");
    $self->_pump;
    return;
}

sub _enqueue {
    my ($self, $bytes) = @_;
    my $len = length $bytes;
    if ($len > $self->{max_message_bytes} || $len > $self->{max_buffer_bytes}) {
        return $self->_count_drop(too_large => 1);
    }
    my $q = $self->{queue};
    push @$q, $bytes;
    $self->{qbytes} += $len;
    while (@$q > $self->{max_buffer_messages} || $self->{qbytes} > $self->{max_buffer_bytes}) {
        my $i = $self->{head_off} ? 1 : 0;    # a half-written message must be finished
        my ($old) = splice @$q, $i, 1;
        $self->{qbytes} -= length $old;
        if ($i == 0 && $self->{report_at_head}) {
            # A dropped drop report hands its counts back instead of counting itself.
            $self->{pending_drops}{$_} += $self->{report_at_head}{$_} for keys %{ $self->{report_at_head} };
            $self->{report_at_head} = undef;
        } else {
            $self->_count_drop(buffer_full => 1);
        }
    }
}

sub _count_drop {
    my ($self, $reason, $n) = @_;
    # Reported once per episode: from the first drop until the count reaches the sidecar.
    $self->_error("dropping messages ($reason); they are counted and reported to the sidecar")
        unless $self->{pending_drops}{$reason};
    $self->{pending_drops}{$reason} += $n;
    $self->{stats}{dropped}{$reason} += $n;
}

# Opportunistic I/O: connect if the backoff allows, then write what the socket takes now.
sub _pump {
    my $self = shift;
    if ($self->{state} eq 'down') {
        return 0 if Time::HiRes::time() < $self->{next_try};
        $self->_connect or return 0;
    }
    if ($self->{state} eq 'connecting') { $self->_check_connect(0) or return 0 }
    return $self->_write;
}

sub _connect {
    my $self = shift;
    return $self->_connect_unix if length($self->{unix_socket} // '');
    $self->{addrs} //= do {
        my ($err, @ai) = getaddrinfo($self->{tcp_host}, $self->{tcp_port}, { socktype => SOCK_STREAM });
        return $self->_fail("cannot resolve $self->{tcp_host}: $err") if $err || !@ai;
        [sort { ($b->{family} == AF_INET) <=> ($a->{family} == AF_INET) } @ai];    # IPv4 first
    };
    my $ai = $self->{addrs}[ $self->{addr_i} % @{ $self->{addrs} } ];
    socket(my $fh, $ai->{family}, SOCK_STREAM, 0) or return $self->_fail("socket: $!");
    $fh->blocking(0);
    if (!connect($fh, $ai->{addr}) && $! != EINPROGRESS && $! != EINTR) {
        return $self->_fail("connect to $self->{where}: $!");
    }
    @$self{qw(sock state connect_t0)} = ($fh, 'connecting', Time::HiRes::time());
    return 1;
}

# A Unix socket connects at once or fails at once (EAGAIN: the sidecar's backlog is full), so a
# non-blocking connect never waits; what follows is the TCP path's.
sub _connect_unix {
    my $self = shift;
    my $fh = IO::Socket::UNIX->new(Type => SOCK_STREAM) or return $self->_fail("socket: $!");
    $fh->blocking(0);
    if (!$fh->connect(pack_sockaddr_un($self->{unix_socket})) && $! != EINPROGRESS && $! != EINTR) {
        return $self->_fail("connect to $self->{where}: $!");
    }
    @$self{qw(sock state connect_t0)} = ($fh, 'connecting', Time::HiRes::time());
    return 1;
}

sub _check_connect {
    my ($self, $wait) = @_;
    my $fh = $self->{sock};
    vec(my $w = '', fileno $fh, 1) = 1;
    if (select(undef, $w, undef, $wait) <= 0) {
        return 0 if Time::HiRes::time() - $self->{connect_t0} < $self->{connect_timeout};
        return $self->_fail("connect to $self->{where}: timed out");
    }
    if (my $err = unpack 'i', getsockopt($fh, SOL_SOCKET, SO_ERROR) // pack 'i', 0) {
        local $! = $err;
        return $self->_fail("connect to $self->{where}: $!");
    }
    @$self{qw(state backoff addr_i)} = ('up', $BACKOFF_MIN, 0);
    $self->{preamble} = $self->{auth} // '';    # the auth message goes first on every connection
    $self->{stats}{connects}++;
    return 1;
}

sub _fail {
    my ($self, $why) = @_;
    CORE::close($self->{sock}) if $self->{sock};
    @$self{qw(sock state head_off preamble)} = (undef, 'down', 0, '');
    my $n = $self->{addrs} ? @{ $self->{addrs} } : 1;
    if (++$self->{addr_i} % $n) {
        $self->{next_try} = 0;    # another address of the same host is worth trying at once
    } else {
        $self->{next_try} = Time::HiRes::time() + $self->{backoff};
        $self->{backoff} = min($self->{backoff} * 2, $BACKOFF_MAX);
    }
    $self->_error($why);
    return 0;
}

sub _write {
    my $self = shift;
    my $q = $self->{queue};
    $self->_queue_drop_report if %{ $self->{pending_drops} } && !$self->{head_off} && !$self->{report_at_head};
    return 1 unless @$q;
    my $fh = $self->{sock};
    # The sidecar only ever talks to refuse a stream, so a readable socket means EOF, a
    # reset or an error line; noticing it before writing keeps messages out of a dead socket.
    my $got = sysread($fh, my $said, 4096);
    if (defined $got) {
        return $self->_fail('sidecar closed the connection') unless $got;
        $self->_error("sidecar said: $said");
    } elsif ($! != EAGAIN && $! != EWOULDBLOCK) {
        return $self->_fail("connection to sidecar lost: $!");
    }
    local $SIG{PIPE} = 'IGNORE' if !$NOSIGNAL;
    while (length $self->{preamble}) {
        my $n = send($fh, $self->{preamble}, $NOSIGNAL);
        if (!defined $n) {
            next if $! == EINTR;
            return 1 if $! == EAGAIN || $! == EWOULDBLOCK;
            return $self->_fail("write to sidecar failed: $!");
        }
        substr($self->{preamble}, 0, $n, '');
    }
    while (@$q) {
        my $chunk = $self->{head_off} ? substr($q->[0], $self->{head_off}) : $q->[0];
        for my $i (1 .. $#$q) {
            last if length $chunk >= $CHUNK;
            $chunk .= $q->[$i];
        }
        my $n = send($fh, $chunk, $NOSIGNAL);
        if (!defined $n) {
            next if $! == EINTR;
            return 1 if $! == EAGAIN || $! == EWOULDBLOCK;
            return $self->_fail("write to sidecar failed: $!");
        }
        $n += $self->{head_off};
        while (@$q && $n >= length $q->[0]) {
            my $done = shift @$q;
            $n -= length $done;
            $self->{qbytes} -= length $done;
            if ($self->{report_at_head}) { $self->{report_at_head} = undef }
            else { $self->{stats}{sent}++ }
        }
        $self->{head_off} = $n;
        return 1 if $n;    # partial write: the socket is full for now
    }
    return 1;
}

sub _queue_drop_report {
    my $self = shift;
    my %counts = %{ $self->{pending_drops} };
    my $bytes = join '', map {
        $self->_encode({ source => $self->{source}, type => 'metric', timestamp => _timestamp(),
            data => { name => 'sdk.dropped_messages', value => $counts{$_}, unit => 'count',
                      tags => { reason => $_ } } })
    } sort keys %counts;
    %{ $self->{pending_drops} } = ();
    unshift @{ $self->{queue} }, $bytes;
    $self->{qbytes} += length $bytes;
    $self->{report_at_head} = \%counts;
}

sub _flush {
    my ($self, $timeout) = @_;
    my $deadline = Time::HiRes::time() + ($timeout // $self->{flush_timeout});
    my $forced = 0;
    while (@{ $self->{queue} }) {
        my $left = $deadline - Time::HiRes::time();
        last if $left <= 0;
        if ($self->{state} eq 'down') {
            last if $forced++;    # one attempt regardless of backoff, then give up
            $self->_connect or last;
        }
        if ($self->{state} eq 'connecting') {
            $self->_check_connect(min($left, 0.05));
            next;
        }
        $self->_write;
        next if !@{ $self->{queue} } || $self->{state} ne 'up';
        vec(my $w = '', fileno $self->{sock}, 1) = 1;
        select(undef, $w, undef, min($deadline - Time::HiRes::time(), 0.05));
    }
    return !@{ $self->{queue} };
}

sub _close {
    my ($self, $timeout) = @_;
    my $ok = $self->_flush($timeout);
    my $unsent = @{ $self->{queue} } - ($self->{report_at_head} ? 1 : 0);
    $self->_count_drop(unsent_at_close => $unsent) if $unsent > 0;
    CORE::close($self->{sock}) if $self->{sock};
    @{ $self->{queue} } = ();
    @$self{qw(sock state qbytes head_off report_at_head next_try closed preamble)} = (undef, 'down', 0, 0, undef, 0, 1, '');
    return $ok;
}

# A forked child must not write into its parent's stream nor resend its parent's buffer.
sub _after_fork {
    my $self = shift;
    CORE::close($self->{sock}) if $self->{sock};    # our copy of the fd only; no shutdown()
    @{ $self->{queue} } = ();
    %{ $self->{pending_drops} } = ();
    $self->{stats} = { sent => 0, connects => 0, errors => 0, dropped => {} };
    @$self{qw(pid sock state qbytes head_off report_at_head next_try backoff preamble)}
        = ($$, undef, 'down', 0, 0, undef, 0, $BACKOFF_MIN, '');
}

sub statistics {
    my $self = shift;
    $self->_after_fork if $self->{pid} != $$;
    return {
        %{ $self->{stats} },
        dropped   => { %{ $self->{stats}{dropped} } },
        queued    => scalar @{ $self->{queue} },
        queued_bytes => $self->{qbytes},
        connected => $self->{state} eq 'up' ? 1 : 0,
    };
}

sub _error {
    my ($self, $message) = @_;
    $self->{stats}{errors}++;
    if (my $cb = $self->{on_error}) {
        local $@;
        eval { $cb->($message); 1 };
        return 0;
    }
    return 0 if $self->{warned}++;
    local $@;    # a __WARN__ handler that dies must not make the SDK die
    eval { warn "Monitoring::SDK($self->{source}): $message (further problems are counted, not printed)\n" };
    return 0;
}

sub DESTROY {
    my $self = shift;
    local ($@, $!, $?);
    delete $LIVE{ refaddr $self };
    $self->close unless $self->{closed} && $self->{pid} == $$;
}

END {
    local $?;
    $_->close for grep { defined && !$_->{closed} } values %LIVE;
}

my ($ts_second, $ts_prefix) = (-1, '');

sub _timestamp {
    my $t = Time::HiRes::time();
    my $s = int $t;
    if ($s != $ts_second) {
        my @g = gmtime $s;
        $ts_prefix = sprintf '%04d-%02d-%02dT%02d:%02d:%02d', $g[5] + 1900, $g[4] + 1, @g[3, 2, 1, 0];
        $ts_second = $s;
    }
    return sprintf '%s.%03dZ', $ts_prefix, ($t - $s) * 1000;
}

# A JSON number, never a string that looks like one; whole values print without ".0".
sub _num {
    my $v = shift;
    return undef unless defined $v && looks_like_number($v);
    $v += 0;
    return undef if $v != $v || $v == 9**9**9 || $v == -9**9**9;
    return $v == int($v) && abs($v) < 1e15 ? int($v) : $v;
}

my $URANDOM;

sub _random_hex {
    my $bytes = shift;
    my $buf = '';
    $URANDOM //= do { my $fh; open($fh, '<:raw', '/dev/urandom') ? $fh : 0 };
    while (1) {
        $buf = '' unless $URANDOM && (sysread($URANDOM, $buf, $bytes) // 0) == $bytes;
        $buf = join '', map { chr int rand 256 } 1 .. $bytes if $buf eq '';
        return unpack 'H*', $buf if $buf =~ /[^\0]/;    # all-zero ids are invalid
        $buf = '';
    }
}

sub _encode {
    my ($self, $msg) = @_;
    return $self->{msgpack} ? $self->_pack($msg) : $self->{json}->encode($msg) . "\n";
}

sub _pack {
    my ($self, $msg) = @_;
    _upgrade_strings($msg);
    return $self->{msgpack}->pack($msg);
}

# MessagePack writes a string's internal bytes; upgrading makes every str valid UTF-8.
sub _upgrade_strings {
    for my $v (values %{ $_[0] }) {
        if (ref $v eq 'HASH') { _upgrade_strings($v) }
        elsif (defined $v && !ref $v && !looks_like_number($v)) { utf8::upgrade($v) }
    }
}

1;

__END__

=encoding utf8

=head1 NAME

Monitoring::SDK - thin, non-blocking client of the monitoring-sidecar telemetry daemon

=head1 SYNOPSIS

The seed's programs, as they are written:

    use Monitoring::SDK;

    my $mon = Monitoring::SDK->new(
        source => 'queue-service',
        tcp_host => 'localhost',
        tcp_port => 17000
    );

    while (my $job = dequeue()) {
        my $span_id = $mon->start_span('process_job');
        $mon->set_context('job_id', $job->{id});

        $mon->log_progress($job->{id}, 0, 'started');

        # Call script: it joins this trace and job through TRACEPARENT/MONITORING_CONTEXT
        system("perl db_loader.pl $job->{file}");

        $mon->log_progress($job->{id}, 100, 'completed');
        $mon->end_span($span_id, 'success');

        $mon->log_metric('jobs_processed', 1, 'count');
    }

Other calls:

    $mon->log_event('info', 'Reading config file', {file => $config_file});
    $mon->log_metric('config_size_kb', length($config) / 1024, 'kilobytes');
    $mon->log_metric('file_valid', 1);
    $mon->log_metric('latency', 12.5, 'ms', {endpoint => '/upload'});
    $mon->log_resource(cpu_percent(), memory_mb(), disk_io_mb());
    $mon->close;

=head1 DESCRIPTION

Services and scripts call this module; it writes one message per call to the monitoring
sidecar over a local TCP connection (wire protocol v1: JSON lines, or MessagePack). The sidecar
correlates messages by trace and job and routes them to its backends; the SDK knows nothing
about routing or backends.

The SDK never blocks its caller, never dies and never floods STDERR:

=over 4

=item *

Each call encodes its message into an in-process buffer and writes what the non-blocking
socket accepts at that moment. There is no thread and no timer: a backlog drains on later
calls, and at C<close>, object destruction or program exit.

=item *

The buffer is bounded (C<max_buffer_messages>, C<max_buffer_bytes>). When it is full the
oldest messages are dropped and counted. Once a connection is up again the counts are sent
first, as metric messages
C<{name: "sdk.dropped_messages", value: N, unit: "count", tags: {reason: "buffer_full"}}>
(other reasons: C<too_large> for a message over C<max_message_bytes>, C<unsent_at_close>).

=item *

Connecting is lazy and non-blocking (never in C<new>). After a failure the next attempt waits
0.1 s, doubling up to 30 s; calls in between only buffer. A connection the sidecar closed is
noticed before the next write, so messages are not written into a dead socket, and a message
that was half written is sent again whole on the new connection: nothing is duplicated.

=item *

Writes use C<MSG_NOSIGNAL> (or a local C<$SIG{PIPE} = 'IGNORE'> where the platform lacks it):
a sidecar that goes away cannot kill the host with SIGPIPE.

=item *

After C<fork>, the child notices C<$$> changed on its first call: it closes its copy of the
parent's socket (without shutting it down), forgets the parent's buffer and opens its own
connection. Active spans and context are kept, so the child stays in the same trace.

=item *

The first problem is reported with one C<warn>; later ones are only counted (see
L</statistics>). Give C<on_error> to receive every problem instead. Public methods also
leave C<$@> and C<$!> as they were.

=back

=head1 INSTALLATION

Needs Perl 5.14 or later and core modules only. On Debian or Ubuntu, the optional faster JSON
encoder and the MessagePack encoding come from:

    apt-get install -y libcpanel-json-xs-perl libdata-messagepack-perl

Then, from F<sdk_clients/perl>:

    perl Makefile.PL && make && make test && make install

Without L<Cpanel::JSON::XS> the SDK uses the core L<JSON::PP> and writes the same bytes, more
slowly. L<Data::MessagePack> is needed only for C<< encoding => 'msgpack' >>.

=head1 CONSTRUCTOR

=head2 new

    my $mon = Monitoring::SDK->new(source => 'db-loader', tcp_host => 'localhost', tcp_port => 17000);

Never connects and never fails. Options:

=over 4

=item source

Service or script name (default: the script's file name).

=item tcp_host, tcp_port

The sidecar (default C<localhost>, C<17000>). IPv4 addresses are tried first.

=item unix_socket

The path of the sidecar's Unix socket, in place of C<tcp_host> and C<tcp_port> (connected with
L<IO::Socket::UNIX>, non-blocking). The recommended transport beside an application: no port,
and the socket file's mode decides who may connect. A missing socket file or a refused
connection is retried with the same backoff as over TCP.

=item token

The sidecar's ingest token. Sent first on every connection and reconnection, before any
message, as the auth message C<{"auth":"TOKEN"}> (a MessagePack map with
C<< encoding => 'msgpack' >>); it is never put in a message or in an error. A sidecar that
refuses it answers one C<error:> line and closes: the SDK reports it like a lost connection
and reconnects with backoff.

=item encoding

C<json> (default) or C<msgpack>. Keep C<json> for throughput: the sidecar decodes JSON lines in
its native hot path, and MessagePack on its Python path, at about a third of the rate.

=item max_buffer_messages, max_buffer_bytes

Bounds of the buffer (default 10000 messages, 8 MiB).

=item max_message_bytes

Larger messages are dropped (default 1 MiB, the sidecar's limit).

=item flush_timeout

Seconds C<close>, object destruction and program exit wait at most for the buffer to drain
(default 2).

=item connect_timeout

Seconds a connection attempt may stay pending before it counts as failed (default 5).

=item on_error

A code ref called with a one-line description of each problem, instead of the single C<warn>.

=back

=head1 ENVIRONMENT

=over 4

=item MONITORING_SIDECAR

C<host:port> (or C<[v6addr]:port>), or C<unix:/path> for a Unix socket. Wins over
C<tcp_host>/C<tcp_port> and C<unix_socket>, so programs that hard-code C<localhost:17000> can be
pointed at another sidecar.

=item MONITORING_SIDECAR_TOKEN

The ingest token; wins over C<token>.

=item MONITORING_SOURCE

Wins over C<source>.

=item TRACEPARENT

W3C trace context, C<00-E<lt>trace_idE<gt>-E<lt>span_idE<gt>-01>. Read by C<new>: with no local
span active, messages carry its trace_id, and its span id as span_id; a local span becomes
its child. While a span is active the SDK sets it to that span, and restores it when the last
span ends.

=item MONITORING_CONTEXT

A JSON object. Read by C<new> as the initial C<set_context> values; the SDK keeps it equal to
the current context.

=back

Both are read again when a span starts with no local span active: a consumer that restores
the propagation values a producer stored with a queue entry (as the example pipeline's
C<dequeue> does) puts that span in the producer's trace and job.

=head1 METHODS

All methods return at once. Arguments the protocol cannot carry (a value that is not a
number, an unknown span id) are reported through C<on_error> (or the one warning) and the
call does nothing.

=head2 log_event($level, $message, \%context)

C<$level> is one of C<debug info warning error critical>; C<warn>, C<err>, C<crit> and
C<fatal> are accepted as aliases and case does not matter (any other level is sent as given,
and the sidecar counts the message as invalid). C<\%context> is optional and is merged over
the values of C<set_context> for this message only.

=head2 log_metric($name, $value, $unit, \%tags)

C<$value> must look like a number and is sent as a JSON number. C<$unit> and C<\%tags>
(string values) are optional.

=head2 log_progress($job_id, $percent, $status)

C<$status> defaults to C<running>.

=head2 log_resource($cpu_percent, $memory_mb, $disk_io_mb, $network_io_mb)

Undefined values are left out of the message.

=head2 start_span($name)

Starts a span inside the innermost active one (or under C<TRACEPARENT>, or as the root of a
new trace) and returns its id, 16 hex digits. Messages sent until it ends carry its ids.

=head2 end_span($span_id, $status)

Ends the span (C<$status> defaults to C<success>); the end message carries C<duration_ms>.
When a root span (one started with no span active) ends, the context goes back to what it was
when it started, after its end message is sent, and C<MONITORING_CONTEXT> follows (unset when
the context is empty). Spans may end in any order: the context is restored when the root span
ends, whichever spans are still active.

=head2 set_context($key, $value)

Sets a value sent in the C<context> of every later message (C<undef> removes it) and exported
in C<MONITORING_CONTEXT>. C<job_id> is always sent as a string. Set with no span active, the
value lasts until it is changed or removed. Set while a root span is active, it belongs to that
span: it is undone when the span ends (a nested span does not scope it). So the seed's
queue-service loop, C<start_span('process_job')> then C<set_context('job_id', ...)>, never
sends one job's messages under the previous job's id.

=head2 flush($timeout)

Tries to send everything buffered within C<$timeout> seconds (default C<flush_timeout>),
making one connection attempt at once if there is no connection. Returns true when the
buffer is empty.

=head2 close($timeout)

C<flush>, then closes the connection; what could not be sent is counted as
C<unsent_at_close>. Returns true when everything was sent. The object stays usable: a later
call connects again. Objects still alive at program exit are closed by an C<END> block, and an
object going out of scope is closed by C<DESTROY>.

=head2 statistics

A hash ref of counters: C<sent>, C<queued>, C<queued_bytes>, C<dropped> (a hash by reason),
C<connects>, C<errors>, C<connected>.

=head1 WIRE FORMAT

One JSON object per line (UTF-8, keys sorted), or one MessagePack map per message:

    {"context":{"job_id":"job-12345"},"data":{"job_id":"job-12345","percent":0,"status":"started"},
     "source":"queue-service","span_id":"4f2a9c1d0b7e6a53","timestamp":"2025-10-20T10:30:45.123Z",
     "trace_id":"0af7651916cd43dd8448eb211c80319c","type":"progress"}

C<trace_id>, C<span_id> and C<parent_span_id> appear only inside a trace, C<context> only when
it is not empty. F<docs/protocol.md> in the repository (wire protocol v1) gives the data of each type.

=head1 WHEN THE SIDECAR IS DOWN

Calls keep returning at once: messages wait in the buffer, the oldest are dropped (and
counted) when it is full, and the first connection that succeeds delivers the buffer,
preceded by the drop counts. One warning is printed the first time
(C<Monitoring::SDK(source): connect to localhost:17000: Connection refused (further problems
are counted, not printed)>). At exit, C<close> makes one connection attempt and gives up at
once if it is refused; it waits up to C<flush_timeout> only for a sidecar that is slow to
accept or to read.

=head1 PERFORMANCE

F<bench/perl_sdk.pl> in the repository measures single calls (20,000 per case) with a local
reader draining the socket, and with nothing listening (then the buffer is full and every call
also drops the oldest message). A typical run on the project's 2-core development VM, Perl
5.36 with Cpanel::JSON::XS:

    case          call           p50 us    p99 us
    sidecar up    log_event        22.2      39.4
    sidecar up    log_metric       23.8      42.9
    sidecar down  log_event        16.1      28.8
    sidecar down  log_metric       16.2      33.5

Over five runs while other builds shared the VM, p99 was 31-43 us with the sidecar up and
19-35 us with it down, except one run at 68 us (up). Most of a call is Perl work (building and
encoding the message, 10-15 us here); with a connection, C<send> and the dead-peer check add
about 8 us. Connection attempts happen only at backoff times.

=head1 SEE ALSO

F<examples/perl-pipeline/> in the repository: the seed's four programs running end to end.

F<docs/protocol.md> in the repository: wire protocol v1, and how context and spans scope each other.

=head1 LICENSE

Copyright the monitoring-sidecar developers.

Licensed under the Apache License, Version 2.0 (the F<LICENSE> file of this distribution, or
L<https://www.apache.org/licenses/LICENSE-2.0>). Distributed on an "AS IS" BASIS, WITHOUT
WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.

=cut
