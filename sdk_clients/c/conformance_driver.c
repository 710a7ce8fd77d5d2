/* Conformance driver (sdk_clients/conformance/DRIVERS.md): replays a scenario's calls with the
 * C SDK. Usage: conformance-driver SCENARIO.json, with MONITORING_SIDECAR set by the harness. */
#define _POSIX_C_SOURCE 200809L
#include <json-c/json.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "monitoring_sdk.h"

#define MAX_SAVED 256

static struct { char name[64]; char id[17]; } saved[MAX_SAVED];
static int nsaved;

static json_object *arg(json_object *args, size_t i) {
    return args && i < json_object_array_length(args) ? json_object_array_get_idx(args, i) : NULL;
}

static const char *str(json_object *v) { /* null -> NULL; {"ref": name} -> the saved span id */
    json_object *ref;
    if (!v || json_object_is_type(v, json_type_null)) return NULL;
    if (json_object_is_type(v, json_type_object) && json_object_object_get_ex(v, "ref", &ref)) {
        for (int i = 0; i < nsaved; i++)
            if (!strcmp(saved[i].name, json_object_get_string(ref))) return saved[i].id;
        return "";
    }
    return json_object_get_string(v);
}

static double num(json_object *v) {
    return !v || json_object_is_type(v, json_type_null) ? NAN : json_object_get_double(v);
}

static mon_kv *kvs(json_object *v) { /* a JSON object -> a NULL-terminated mon_kv array */
    if (!v || !json_object_is_type(v, json_type_object)) return NULL;
    mon_kv *out = calloc((size_t)json_object_object_length(v) + 1, sizeof *out);
    size_t n = 0;
    if (!out) return NULL;
    json_object_object_foreach(v, key, val) {
        out[n].key = key;
        out[n++].value = str(val);
    }
    return out;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s SCENARIO.json\n", argv[0]); return 2; }
    json_object *scenario = json_object_from_file(argv[1]), *calls, *source;
    if (!scenario || !json_object_object_get_ex(scenario, "calls", &calls) || !json_object_is_type(calls, json_type_array)) {
        fprintf(stderr, "%s: cannot read a scenario with \"calls\" from %s\n", argv[0], argv[1]);
        return 2;
    }
    json_object_object_get_ex(scenario, "source", &source);
    mon_client *mon = mon_init(str(source), "localhost", 17000);
    if (!mon) { fprintf(stderr, "%s: mon_init failed\n", argv[0]); return 1; }
    for (size_t i = 0; i < json_object_array_length(calls); i++) {
        json_object *c = json_object_array_get_idx(calls, i), *name = NULL, *args = NULL, *save = NULL, *print = NULL;
        json_object_object_get_ex(c, "call", &name);
        json_object_object_get_ex(c, "args", &args);
        json_object_object_get_ex(c, "save", &save);
        json_object_object_get_ex(c, "print", &print);
        const char *call = name ? json_object_get_string(name) : "";
        char span_id[17] = "";
        mon_kv *map = NULL;
        int rc = 0;
        if (!strcmp(call, "set_context")) {
            json_object *v = arg(args, 1);
            if (v && !json_object_is_type(v, json_type_null) && !json_object_is_type(v, json_type_string))
                rc = mon_set_context_json(mon, str(arg(args, 0)), json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN));
            else rc = mon_set_context(mon, str(arg(args, 0)), str(v));
        } else if (!strcmp(call, "log_event")) {
            rc = mon_log_event(mon, str(arg(args, 0)), str(arg(args, 1)), map = kvs(arg(args, 2)));
        } else if (!strcmp(call, "log_metric")) {
            rc = mon_log_metric(mon, str(arg(args, 0)), num(arg(args, 1)), str(arg(args, 2)), map = kvs(arg(args, 3)));
        } else if (!strcmp(call, "log_progress")) {
            rc = mon_log_progress(mon, str(arg(args, 0)), num(arg(args, 1)), str(arg(args, 2)));
        } else if (!strcmp(call, "log_resource")) {
            rc = mon_log_resource(mon, num(arg(args, 0)), num(arg(args, 1)), num(arg(args, 2)), num(arg(args, 3)));
        } else if (!strcmp(call, "start_span")) {
            rc = mon_start_span(mon, str(arg(args, 0)), span_id);
            if (save && nsaved < MAX_SAVED) {
                snprintf(saved[nsaved].name, sizeof saved[nsaved].name, "%s", json_object_get_string(save));
                memcpy(saved[nsaved++].id, span_id, sizeof span_id);
            }
        } else if (!strcmp(call, "end_span")) {
            rc = mon_end_span(mon, str(arg(args, 0)), str(arg(args, 1)));
        } else if (!strcmp(call, "print_env")) {
            /* What a child started now would see: the SDK exports into this process's environment. */
            const char *value = getenv(str(arg(args, 0)));
            printf("%s\n", value ? value : "");
            continue;
        } else {
            fprintf(stderr, "%s: unknown call \"%s\"\n", argv[0], call);
            mon_close(mon, 2000);
            return 1;
        }
        free(map);
        if (print && json_object_get_boolean(print)) {
            if (span_id[0]) printf("%s\n", span_id);
            else printf("%d\n", rc);
        }
    }
    fflush(stdout);
    mon_close(mon, 2000);
    json_object_put(scenario);
    return 0;
}
