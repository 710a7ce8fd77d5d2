# Pipeline::cpu_percent reads in percent of one core: a bound on the unit, not on speed.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/../lib";
use Test::More;
use Time::HiRes ();

my $CORES = do { my $n = `getconf _NPROCESSORS_ONLN 2>/dev/null`; $n =~ /^(\d+)/ && $1 > 0 ? $1 : 1 };

# Work whose length is known in CPU time, not in wall time (the machine may be shared).
sub busy_for_cpu_seconds {
    my $seconds = shift;
    my ($user, $system) = times;
    my $until = $user + $system + $seconds;
    my $x = 0;
    while (1) {
        $x += $_ for 1 .. 10_000;
        ($user, $system) = times;
        last if $user + $system >= $until;
    }
    return $x;
}

# CPU spent before Pipeline is loaded (perl's start-up, the modules compiled before it: db_loader
# loads Monitoring::SDK first) must not be divided by the time since it was loaded.
BEGIN { busy_for_cpu_seconds(0.3) }
use Pipeline;

sub plausible {
    my ($value, $what) = @_;
    like($value, qr/^\d+(\.\d)?$/, "$what: a number with one decimal ($value)");
    cmp_ok($value, '>=', 0, "$what: not negative");
    cmp_ok($value, '<=', 100 * $CORES, "$what: at most 100 per core ($CORES cores)");
    # One busy thread, and the wall interval is read around the CPU one: at most one core.
    cmp_ok($value, '<=', 100, "$what: a single thread uses at most one core");
}

plausible(cpu_percent(), 'right after 0.3 s of CPU before the module loaded');

busy_for_cpu_seconds(0.4);
my $busy = cpu_percent();
plausible($busy, 'after a busy loop of 0.4 CPU seconds');
cmp_ok($busy, '>', 0, 'the busy loop shows');

# The next reading covers only the interval since the previous one.
select undef, undef, undef, 0.3;
my $idle = cpu_percent();
plausible($idle, 'after 0.3 s asleep');
cmp_ok($idle, '<', 50, 'an idle interval reads low');

done_testing;
