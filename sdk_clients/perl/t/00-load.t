use strict;
use warnings;
use Test::More;

use_ok('Monitoring::SDK');
ok(Monitoring::SDK->VERSION, 'has a version');
can_ok('Monitoring::SDK', qw(new log_event log_metric log_progress log_resource start_span
                             end_span set_context flush close statistics));
{ no warnings "once"; diag("JSON encoder: $Monitoring::SDK::JSON_CLASS") }
done_testing;
