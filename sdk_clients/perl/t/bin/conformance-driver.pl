#!/usr/bin/env perl
# Conformance driver of the Perl SDK: replays one scenario with the public API.
#
#     perl sdk_clients/perl/t/bin/conformance-driver.pl SCENARIO.json
#
# The contract (arguments, output, exit status) is sdk_clients/conformance/DRIVERS.md. The SDK
# is loaded from this checkout's lib/, not from an installed copy.
use strict;
use warnings;
use FindBin ();
use lib "$FindBin::RealBin/../../lib";
use JSON::PP ();
use Monitoring::SDK;

my %CALLS = map { $_ => 1 } qw(set_context log_event log_metric log_progress log_resource start_span end_span);

my $file = shift @ARGV;
die "usage: $0 SCENARIO.json\n" unless defined $file && !@ARGV;
open my $fh, '<:raw', $file or die "conformance-driver: $file: $!\n";
my $scenario = JSON::PP->new->utf8->decode(do { local $/; <$fh> });
close $fh;

binmode STDOUT, ':raw';
$| = 1;

my $mon = Monitoring::SDK->new(source => $scenario->{source}, tcp_host => 'localhost', tcp_port => 17000);
my %saved;
my $i = 0;
for my $step (@{ $scenario->{calls} || [] }) {
    my $name = $step->{call} // '';
    my @args = map {
        if (ref $_ eq 'HASH' && keys %$_ == 1 && exists $_->{ref}) {
            exists $saved{ $_->{ref} } or die "conformance-driver: call #$i: no saved value named '$_->{ref}'\n";
            $saved{ $_->{ref} };
        } else { $_ }
    } @{ $step->{args} || [] };
    if ($name eq 'print_env') {
        print $ENV{ $args[0] } // '', "\n";
    } elsif ($CALLS{$name}) {
        my $result = $mon->$name(@args);
        $saved{ $step->{save} } = $result if defined $step->{save};
        print $result // '', "\n" if $step->{print};
    } else {
        die "conformance-driver: call #$i: unknown call '$name'\n";
    }
    $i++;
}
warn "conformance-driver: close() could not write out every message\n" unless $mon->close(10);    # generous: only an upper bound
exit 0;
