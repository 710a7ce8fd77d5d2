package TestServer;

# A stand-in sidecar for the tests: a forked listener on 127.0.0.1 (or on the Unix socket
# `unix => $path`) that records what it receives. Modes: 'lines' (JSON lines, one record per line with its connection number),
# 'raw' (bytes per connection, for MessagePack), 'stall' (accepts, never reads) and
# 'close' (accepts and hangs up at once).

use strict;
use warnings;
use JSON::PP ();
use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::INET;
use IO::Socket::UNIX;
use Socket qw(SOCK_STREAM);
use POSIX ();
use Time::HiRes qw(sleep time);

my $JSON = JSON::PP->new->utf8;

sub new {
    my ($class, %opt) = @_;
    my $self = bless { mode => 'lines', port => 0, owner => $$, %opt }, $class;
    $self->{dir} //= tempdir(CLEANUP => 1);
    return $self->start;
}

sub port { $_[0]{port} }
sub dir  { $_[0]{dir} }

sub start {
    my $self = shift;
    my $listener;
    if (defined $self->{unix}) {
        unlink $self->{unix};    # a previous start's socket
        $listener = IO::Socket::UNIX->new(Local => $self->{unix}, Type => SOCK_STREAM, Listen => 128)
            or die "TestServer: cannot listen on $self->{unix}: $!";
    } else {
        $listener = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1', LocalPort => $self->{port}, Proto => 'tcp',
            Listen => 128, ReuseAddr => 1,
        ) or die "TestServer: cannot listen: $!";
        $self->{port} = $listener->sockport;
    }
    defined(my $pid = fork) or die "TestServer: fork: $!";
    if (!$pid) {
        eval { $self->_serve($listener) };
        POSIX::_exit(0);
    }
    close $listener;
    $self->{pid} = $pid;
    return $self;
}

sub stop {
    my $self = shift;
    return if $self->{owner} != $$;    # a forked test child must not stop its parent's server
    my $pid = delete $self->{pid} or return;
    kill 'KILL', $pid;
    waitpid $pid, 0;
    unlink $self->{unix} if defined $self->{unix};    # nothing listens there now
}

sub DESTROY { local $?; $_[0]->stop }

sub _serve {
    my ($self, $listener) = @_;
    my $parent = getppid;
    my $sel = IO::Select->new($listener);
    my (%conn_id, %pending, @held);
    my $next = $self->_connections;
    open my $out, '>>:raw', "$self->{dir}/lines" or die $!;
    $out->autoflush(1);
    while (getppid == $parent) {
        for my $fh ($sel->can_read(0.1)) {
            if ($fh == $listener) {
                my $c = $listener->accept or next;
                my $id = ++$next;
                open my $mark, '>', "$self->{dir}/conn.$id" or die $!;
                close $mark;
                if    ($self->{mode} eq 'close') { close $c }
                elsif ($self->{mode} eq 'stall') { push @held, $c }
                else { $sel->add($c); $conn_id{$c} = $id; $pending{$c} = '' }
                next;
            }
            my $n = sysread $fh, my $data, 65536;
            if (!$n) {    # keep our end open: the SDK must see a live peer after its own shutdown
                $sel->remove($fh);
                push @held, $fh;
                next;
            }
            my $id = $conn_id{$fh};
            if ($self->{mode} eq 'raw') {
                open my $raw, '>>:raw', "$self->{dir}/conn.$id" or die $!;
                print {$raw} $data;
                close $raw;
                next;
            }
            $pending{$fh} .= $data;
            my $end = rindex $pending{$fh}, "\n";
            next if $end < 0;
            my $complete = substr $pending{$fh}, 0, $end + 1, '';
            print {$out} map { "$id\t$_\n" } split /\n/, $complete;
        }
    }
}

sub _connections {
    my $self = shift;
    return scalar(my @c = glob "$self->{dir}/conn.*");
}

# Number of connections accepted so far (over all restarts).
sub connections { $_[0]->_connections }

# Every line received so far: { conn => n, raw => "json text", msg => decoded }.
sub lines {
    my $self = shift;
    open my $in, '<:raw', "$self->{dir}/lines" or return [];
    my @out;
    while (my $l = <$in>) {
        chomp $l;
        my ($conn, $raw) = split /\t/, $l, 2;
        push @out, { conn => $conn, raw => $raw, msg => eval { $JSON->decode($raw) } };
    }
    return \@out;
}

sub messages { [map { $_->{msg} } @{ $_[0]->lines }] }

# Raw bytes received on connection $id (mode 'raw').
sub raw_bytes {
    my ($self, $id) = @_;
    open my $in, '<:raw', "$self->{dir}/conn.$id" or return '';
    local $/;
    return scalar <$in>;
}

# Poll until $n lines have arrived (or the deadline passes); returns the lines.
sub wait_lines {
    my ($self, $n, $timeout) = @_;
    my $deadline = time + ($timeout // 5);
    while (1) {
        my $lines = $self->lines;
        return $lines if @$lines >= $n || time > $deadline;
        sleep 0.01;
    }
}

# Command line running a Perl script with this test's @INC (blib, t/lib, ...).
sub perl_cmd {
    my ($script, @args) = @_;
    return ($^X, (map { "-I$_" } grep { !ref } @INC), $script, @args);
}

sub wait_until {
    my ($cond, $timeout) = @_;
    my $deadline = time + ($timeout // 5);
    until ($cond->()) {
        return 0 if time > $deadline;
        sleep 0.01;
    }
    return 1;
}

1;
