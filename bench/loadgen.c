/*
 * bench/loadgen.c -- the load generator of `make bench` (libldap, one thread per connection).
 *
 *   loadgen short|bind|search|bigsearch -H URL [-c N] [-d N] [-t SEC] [-w SEC] [-n USERS] [-Z]
 *           [-S base|sub] [-b PEOPLE_DN] [-p PREFIX] [-C CAFILE] [-T SEC] [-R BYTES] [-l LABEL]
 *
 * Scenarios (user k is uid=user<k>,<PEOPLE_DN> with password <PREFIX><k>, k random in 1..USERS):
 *   short   each worker loops: ldap_initialize, [StartTLS with -Z; or an ldaps:// URL],
 *           simple bind as a random user, one search for that user (-S sub: subtree search
 *           (uid=user<k>) under PEOPLE_DN, the default; -S base: base search of the user's DN),
 *           unbind.  One op = one whole session.
 *   bind    persistent connections (-c), each repeating simple binds as random users.
 *   search  persistent connections (-c), each bound once as a random user, each keeping -d
 *           subtree searches (uid=user<k>) outstanding (ldap_search_ext + ldap_result).
 *   bigsearch like search, but each search is (objectClass=inetOrgPerson) under PEOPLE_DN
 *           and must return all USERS entries (-n); entries are taken one message at a time
 *           (ldap_result LDAP_MSG_ONE) and freed at once, as a streaming client would.
 * A search must return exactly one entry (bigsearch: USERS entries); anything else, a failed
 * bind, StartTLS or connection, or an operation taking longer than -T seconds (bigsearch:
 * no message for -T seconds) is an error.
 *
 * Bytes received: on the persistent connections (bind, search, bigsearch) a counting
 * Sockbuf layer at LBER_SBIOD_LEVEL_APPLICATION (above TLS and the read-ahead layer) counts
 * every byte libldap reads: the LDAP messages themselves, BER headers included, decrypted
 * when the connection uses TLS.  The main thread sums the workers' counters at the start
 * and at the end of the window: rx_bytes and rx_bytes_per_s in the JSON line are the bytes
 * of LDAP responses received inside the window (whether or not their operation completed).
 *
 * Timing: workers run for -w SEC of warm-up, then -t SEC are measured; only operations that
 * complete inside the measured window count.  At the start and at the end of the window
 * the main thread prints the lines "#window-start" and "#window-end" (flushed), so a harness
 * can sample other processes' CPU over exactly that window.  Then it prints one JSON line:
 * ops, ops_per_s, errors, lat_us{p50,p90,p99,max,mean}, and the load generator's own CPU
 * time in the window (cpu_s, from getrusage, all threads).  A SIGALRM watchdog ends a
 * run that cannot stop (warm-up + duration + op timeout + 15 s).
 *
 * TLS: the CA file (-C) is set as the global LDAP_OPT_X_TLS_CACERTFILE, certificates are
 * required (LDAP_OPT_X_TLS_REQUIRE_CERT = demand) and a new global TLS context is made
 * (LDAP_OPT_X_TLS_NEWCTX) before any connection.  Run it with LDAPNOINIT=1 so that
 * ldap.conf and LDAP* variables do not interfere.
 */
#define _GNU_SOURCE
#include <lber.h>
#include <ldap.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

enum scenario { SHORT, BIND, SEARCH, BIGSEARCH };
static const char *const scenario_names[] = {"short", "bind", "search", "bigsearch"};
#define N_SCENARIOS ((int)(sizeof scenario_names / sizeof *scenario_names))

/* options */
static enum scenario scenario;
static const char *url;
static int conns = 8, depth = 4, users = 10000, use_starttls, base_search;
static double duration = 4, warmup = 1, op_timeout = 10;
static const char *people = "ou=people,dc=example,dc=com";
static const char *pw_prefix = "pass";
static const char *cafile, *label = "";
static ber_len_t readahead = 65536;

/* run state */
static double t_window_start, t_window_end; /* CLOCK_MONOTONIC, seconds */
static volatile int stopping;
static pthread_mutex_t first_error_lock = PTHREAD_MUTEX_INITIALIZER;
static char first_error[512];

struct worker {
	pthread_t thread;
	uint64_t seed;
	uint64_t ops, errors;
	uint64_t rx_bytes; /* bytes libldap read on this worker's connections (atomic) */
	uint32_t *lat_us;
	size_t n_lat, cap_lat;
	volatile int finished;
};
static struct worker *workers;

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int random_user(struct worker *w) {
	/* splitmix64: cheap, per worker, good enough to spread users */
	uint64_t z = (w->seed += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	z ^= z >> 31;
	return (int)(z % (uint64_t)users) + 1;
}

static void completed(struct worker *w, double started) {
	double t = now();
	if (t < t_window_start || t > t_window_end) return;
	if (w->n_lat == w->cap_lat) {
		size_t cap = w->cap_lat ? w->cap_lat * 2 : 16384;
		uint32_t *p = realloc(w->lat_us, cap * sizeof *p);
		if (!p) return;
		w->lat_us = p;
		w->cap_lat = cap;
	}
	double us = (t - started) * 1e6;
	w->lat_us[w->n_lat++] = us > 4e9 ? 4000000000u : (uint32_t)us;
	w->ops++;
}

static void failed(struct worker *w, const char *fmt, ...) {
	w->errors++;
	pthread_mutex_lock(&first_error_lock);
	if (!first_error[0]) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(first_error, sizeof first_error, fmt, ap);
		va_end(ap);
		fprintf(stderr, "loadgen %s %s: first error: %s\n", scenario_names[scenario], url,
		        first_error);
	}
	pthread_mutex_unlock(&first_error_lock);
}

static void user_dn(char *buf, size_t size, int k) { snprintf(buf, size, "uid=user%d,%s", k, people); }

/* A new connection, StartTLS done if asked for; NULL (error counted) on failure. */
static LDAP *open_connection(struct worker *w) {
	LDAP *ld = NULL;
	int rc = ldap_initialize(&ld, url);
	if (rc != LDAP_SUCCESS) {
		failed(w, "ldap_initialize: %s", ldap_err2string(rc));
		return NULL;
	}
	int version = LDAP_VERSION3;
	struct timeval tv = {(time_t)op_timeout, 0};
	ldap_set_option(ld, LDAP_OPT_PROTOCOL_VERSION, &version);
	ldap_set_option(ld, LDAP_OPT_REFERRALS, LDAP_OPT_OFF);
	ldap_set_option(ld, LDAP_OPT_NETWORK_TIMEOUT, &tv);
	ldap_set_option(ld, LDAP_OPT_TIMEOUT, &tv);
	if (use_starttls) {
		rc = ldap_start_tls_s(ld, NULL, NULL);
		if (rc != LDAP_SUCCESS) {
			failed(w, "StartTLS: %s (%d)", ldap_err2string(rc), rc);
			ldap_unbind_ext_s(ld, NULL, NULL);
			return NULL;
		}
	}
	return ld;
}

/* Simple bind as user k: LDAP_SUCCESS, or the error (counted); *broken when the connection
 * is unusable afterwards. */
static int bind_user(struct worker *w, LDAP *ld, int k, int *broken) {
	char dn[512], pw[64];
	user_dn(dn, sizeof dn, k);
	snprintf(pw, sizeof pw, "%s%d", pw_prefix, k);
	struct berval cred = {strlen(pw), pw};
	int rc = ldap_sasl_bind_s(ld, dn, LDAP_SASL_SIMPLE, &cred, NULL, NULL, NULL);
	if (rc != LDAP_SUCCESS) {
		failed(w, "bind as %s: %s (%d)", dn, ldap_err2string(rc), rc);
		*broken = rc < 0 || rc == LDAP_UNAVAILABLE || rc == LDAP_BUSY;
	}
	return rc;
}

/* One synchronous search for user k that must return exactly that entry. */
static int search_user(struct worker *w, LDAP *ld, int k) {
	char dn[512], filter[64];
	user_dn(dn, sizeof dn, k);
	snprintf(filter, sizeof filter, "(uid=user%d)", k);
	struct timeval tv = {(time_t)op_timeout, 0};
	LDAPMessage *res = NULL;
	int rc = base_search ? ldap_search_ext_s(ld, dn, LDAP_SCOPE_BASE, filter, NULL, 0, NULL, NULL,
	                                         &tv, 0, &res)
	                     : ldap_search_ext_s(ld, people, LDAP_SCOPE_SUBTREE, filter, NULL, 0, NULL,
	                                         NULL, &tv, 0, &res);
	int entries = res ? ldap_count_entries(ld, res) : -1;
	if (res) ldap_msgfree(res);
	if (rc != LDAP_SUCCESS) {
		failed(w, "search %s: %s (%d)", filter, ldap_err2string(rc), rc);
		return rc;
	}
	if (entries != 1) {
		failed(w, "search %s: %d entries instead of 1", filter, entries);
		return LDAP_OTHER;
	}
	return LDAP_SUCCESS;
}

/* A Sockbuf layer that passes everything through and adds the bytes read to a counter. */
static int count_setup(Sockbuf_IO_Desc *sbiod, void *arg) {
	sbiod->sbiod_pvt = arg;
	return 0;
}
static int count_remove(Sockbuf_IO_Desc *sbiod) {
	(void)sbiod;
	return 0;
}
static int count_ctrl(Sockbuf_IO_Desc *sbiod, int opt, void *arg) {
	return LBER_SBIOD_CTRL_NEXT(sbiod, opt, arg);
}
static ber_slen_t count_read(Sockbuf_IO_Desc *sbiod, void *buf, ber_len_t len) {
	ber_slen_t n = LBER_SBIOD_READ_NEXT(sbiod, buf, len);
	if (n > 0) __atomic_add_fetch((uint64_t *)sbiod->sbiod_pvt, (uint64_t)n, __ATOMIC_RELAXED);
	return n;
}
static ber_slen_t count_write(Sockbuf_IO_Desc *sbiod, void *buf, ber_len_t len) {
	return LBER_SBIOD_WRITE_NEXT(sbiod, buf, len);
}
static Sockbuf_IO counting_io = {count_setup, count_remove, count_ctrl,
                                  count_read,  count_write,  NULL};

/* On persistent connections: read ahead below TLS (fewer read() calls per response), and
 * count the bytes received at the top of the stack. */
static void add_layers(struct worker *w, LDAP *ld) {
	Sockbuf *sb = NULL;
	if (ldap_get_option(ld, LDAP_OPT_SOCKBUF, &sb) != LDAP_OPT_SUCCESS || !sb) return;
	if (readahead)
		ber_sockbuf_add_io(sb, &ber_sockbuf_io_readahead, LBER_SBIOD_LEVEL_PROVIDER, &readahead);
	ber_sockbuf_add_io(sb, &counting_io, LBER_SBIOD_LEVEL_APPLICATION, &w->rx_bytes);
}

static void pause_after_error(void) { usleep(20000); }

static void run_short(struct worker *w) {
	while (!stopping) {
		double started = now();
		int k = random_user(w), broken = 0, ok = 0;
		LDAP *ld = open_connection(w);
		if (ld) {
			ok = bind_user(w, ld, k, &broken) == LDAP_SUCCESS && search_user(w, ld, k) == LDAP_SUCCESS;
			ldap_unbind_ext_s(ld, NULL, NULL);
		}
		if (ok) completed(w, started);
		else pause_after_error();
	}
}

/* A persistent connection bound as a random user (for search), or NULL once stopping. */
static LDAP *bound_connection(struct worker *w) {
	while (!stopping) {
		LDAP *ld = open_connection(w);
		int broken = 0;
		if (ld && bind_user(w, ld, random_user(w), &broken) == LDAP_SUCCESS) {
			add_layers(w, ld);
			return ld;
		}
		if (ld) ldap_unbind_ext_s(ld, NULL, NULL);
		pause_after_error();
	}
	return NULL;
}

static void run_bind(struct worker *w) {
	LDAP *ld = NULL;
	while (!stopping) {
		if (!ld) {
			ld = open_connection(w);
			if (!ld) { pause_after_error(); continue; }
			add_layers(w, ld);
		}
		double started = now();
		int broken = 0;
		if (bind_user(w, ld, random_user(w), &broken) == LDAP_SUCCESS) {
			completed(w, started);
		} else {
			if (broken) { ldap_unbind_ext_s(ld, NULL, NULL); ld = NULL; }
			pause_after_error();
		}
	}
	if (ld) ldap_unbind_ext_s(ld, NULL, NULL);
}

struct pending { int msgid, entries; double started; };

static void run_search(struct worker *w) {
	struct pending *slots = calloc((size_t)depth, sizeof *slots);
	LDAP *ld = NULL;
	int outstanding = 0, big = scenario == BIGSEARCH, expected = big ? users : 1;
	double last_message = now(); /* bigsearch: the op timeout counts from the last message */
	char filter[64];
	for (;;) {
		if (!ld) {
			if (stopping || !(ld = bound_connection(w))) break;
			outstanding = 0;
			memset(slots, 0, (size_t)depth * sizeof *slots);
		}
		int broken = 0;
		/* keep the pipeline full (not once stopping: then drain) */
		for (int i = 0; i < depth && !stopping && !broken; i++) {
			if (slots[i].msgid) continue;
			if (big) snprintf(filter, sizeof filter, "(objectClass=inetOrgPerson)");
			else snprintf(filter, sizeof filter, "(uid=user%d)", random_user(w));
			int msgid, rc = ldap_search_ext(ld, people, LDAP_SCOPE_SUBTREE, filter, NULL, 0, NULL,
			                                NULL, NULL, 0, &msgid);
			if (rc != LDAP_SUCCESS) {
				failed(w, "search send: %s (%d)", ldap_err2string(rc), rc);
				broken = 1;
				break;
			}
			slots[i] = (struct pending){msgid, 0, now()};
			outstanding++;
		}
		if (!broken && outstanding == 0) break; /* stopping, and drained */
		if (!broken) {
			struct timeval tv = {0, 200000};
			LDAPMessage *msg = NULL;
			int type = ldap_result(ld, LDAP_RES_ANY, LDAP_MSG_ONE, &tv, &msg);
			if (type < 0) {
				int err = LDAP_OTHER;
				ldap_get_option(ld, LDAP_OPT_RESULT_CODE, &err);
				failed(w, "ldap_result: %s (%d)", ldap_err2string(err), err);
				broken = 1;
			} else if (type == 0) {
				double t = now();
				for (int i = 0; i < depth; i++)
					if (slots[i].msgid &&
					    t - (big && last_message > slots[i].started ? last_message
					                                                : slots[i].started) > op_timeout) {
						failed(w, "search: no answer after %.0f s", op_timeout);
						broken = 1;
						break;
					}
			} else {
				int id = ldap_msgid(msg), i;
				last_message = now();
				for (i = 0; i < depth && slots[i].msgid != id; i++) {}
				if (i == depth) {
					failed(w, "unexpected message type %d, id %d", type, id);
					broken = type == LDAP_RES_EXTENDED; /* a notice of disconnection */
				} else if (type == LDAP_RES_SEARCH_ENTRY) {
					slots[i].entries++;
				} else if (type == LDAP_RES_SEARCH_RESULT) {
					int err = LDAP_OTHER;
					if (ldap_parse_result(ld, msg, &err, NULL, NULL, NULL, NULL, 0) != LDAP_SUCCESS)
						err = LDAP_OTHER;
					if (err != LDAP_SUCCESS)
						failed(w, "search: %s (%d)", ldap_err2string(err), err);
					else if (slots[i].entries != expected)
						failed(w, "search: %d entries instead of %d", slots[i].entries, expected);
					else
						completed(w, slots[i].started);
					slots[i].msgid = 0;
					outstanding--;
				}
				ldap_msgfree(msg);
			}
		}
		if (broken) {
			ldap_unbind_ext_s(ld, NULL, NULL);
			ld = NULL;
			pause_after_error();
		}
	}
	if (ld) ldap_unbind_ext_s(ld, NULL, NULL);
	free(slots);
}

static void *worker_main(void *arg) {
	struct worker *w = arg;
	switch (scenario) {
	case SHORT: run_short(w); break;
	case BIND: run_bind(w); break;
	case SEARCH:
	case BIGSEARCH: run_search(w); break;
	}
	__atomic_store_n(&w->finished, 1, __ATOMIC_RELEASE);
	return NULL;
}

static int by_value(const void *a, const void *b) {
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static void json_string(FILE *f, const char *s) {
	fputc('"', f);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
		else if (c < 0x20) fprintf(f, "\\u%04x", c);
		else fputc(c, f);
	}
	fputc('"', f);
}

static uint64_t rx_bytes_now(void) {
	uint64_t sum = 0;
	for (int i = 0; i < conns; i++) sum += __atomic_load_n(&workers[i].rx_bytes, __ATOMIC_RELAXED);
	return sum;
}

static void report(int complete, double cpu_window, double window, uint64_t rx_window) {
	uint64_t ops = 0, errors = 0;
	size_t n = 0;
	for (int i = 0; i < conns; i++) {
		ops += workers[i].ops;
		errors += workers[i].errors;
		n += workers[i].n_lat;
	}
	double p50 = 0, p90 = 0, p99 = 0, max = 0, mean = 0;
	uint32_t *all = n ? malloc(n * sizeof *all) : NULL;
	if (all) {
		size_t o = 0;
		double sum = 0;
		for (int i = 0; i < conns; i++) {
			memcpy(all + o, workers[i].lat_us, workers[i].n_lat * sizeof *all);
			o += workers[i].n_lat;
		}
		qsort(all, n, sizeof *all, by_value);
		for (size_t i = 0; i < n; i++) sum += all[i];
#define PERCENTILE(p) ((double)all[(size_t)((p) * (double)(n - 1) + 0.5)])
		p50 = PERCENTILE(0.50);
		p90 = PERCENTILE(0.90);
		p99 = PERCENTILE(0.99);
		max = all[n - 1];
		mean = sum / (double)n;
		free(all);
	}
	printf("{\"scenario\":\"%s\",\"label\":", scenario_names[scenario]);
	json_string(stdout, label);
	printf(",\"url\":");
	json_string(stdout, url);
	printf(",\"starttls\":%s,\"conns\":%d,\"depth\":%d,\"users\":%d,\"warmup_s\":%.3f,"
	       "\"duration_s\":%.3f,\"complete\":%s,\"ops\":%llu,\"ops_per_s\":%.1f,\"errors\":%llu,"
	       "\"lat_us\":{\"p50\":%.0f,\"p90\":%.0f,\"p99\":%.0f,\"max\":%.0f,\"mean\":%.1f},"
	       "\"rx_bytes\":%llu,\"rx_bytes_per_s\":%.1f,"
	       "\"cpu_s\":%.3f,\"cpu_total_s\":%.3f,\"first_error\":",
	       use_starttls ? "true" : "false", conns,
	       scenario == SEARCH || scenario == BIGSEARCH ? depth : 1, users, warmup, window,
	       complete ? "true" : "false", (unsigned long long)ops,
	       window > 0 ? (double)ops / window : 0.0, (unsigned long long)errors, p50, p90, p99, max,
	       mean, (unsigned long long)rx_window, window > 0 ? (double)rx_window / window : 0.0,
	       cpu_window, cpu_seconds());
	json_string(stdout, first_error);
	printf("}\n");
	fflush(stdout);
}

static void watchdog(int sig) {
	(void)sig;
	static const char msg[] = "loadgen: watchdog: the run did not end in time\n";
	if (write(2, msg, sizeof msg - 1) < 0) {}
	_exit(4);
}

static void sleep_until(double t) {
	for (double left; (left = t - now()) > 0;) {
		struct timespec ts = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
		nanosleep(&ts, NULL);
	}
}

static void usage(void) {
	fprintf(stderr,
	        "usage: loadgen short|bind|search|bigsearch -H URL [-c conns] [-d depth] [-t sec]\n"
	        "               [-w sec] [-n users] [-Z] [-S base|sub] [-b people_dn]\n"
	        "               [-p password_prefix] [-C cafile] [-T op_timeout]\n"
	        "               [-R readahead_bytes] [-l label]\n");
	exit(2);
}

int main(int argc, char **argv) {
	if (argc < 2) usage();
	int found = 0;
	for (int i = 0; i < N_SCENARIOS; i++)
		if (!strcmp(argv[1], scenario_names[i])) { scenario = (enum scenario)i; found = 1; }
	if (!found) usage();
	optind = 2;
	for (int c; (c = getopt(argc, argv, "H:c:d:t:w:n:ZS:b:p:C:T:R:l:")) != -1;) {
		switch (c) {
		case 'H': url = optarg; break;
		case 'c': conns = atoi(optarg); break;
		case 'd': depth = atoi(optarg); break;
		case 't': duration = atof(optarg); break;
		case 'w': warmup = atof(optarg); break;
		case 'n': users = atoi(optarg); break;
		case 'Z': use_starttls = 1; break;
		case 'S':
			if (!strcmp(optarg, "base")) base_search = 1;
			else if (!strcmp(optarg, "sub")) base_search = 0;
			else usage();
			break;
		case 'b': people = optarg; break;
		case 'p': pw_prefix = optarg; break;
		case 'C': cafile = optarg; break;
		case 'T': op_timeout = atof(optarg); break;
		case 'R': readahead = (ber_len_t)atol(optarg); break;
		case 'l': label = optarg; break;
		default: usage();
		}
	}
	if (!url || optind != argc || conns < 1 || conns > 1024 || depth < 1 || users < 1 ||
	    duration <= 0 || warmup < 0 || op_timeout < 1)
		usage();
	signal(SIGPIPE, SIG_IGN);

	/* TLS trust for every connection: the global options, then a new global context */
	int demand = LDAP_OPT_X_TLS_DEMAND, zero = 0;
	if (ldap_set_option(NULL, LDAP_OPT_X_TLS_REQUIRE_CERT, &demand) != LDAP_OPT_SUCCESS ||
	    (cafile && ldap_set_option(NULL, LDAP_OPT_X_TLS_CACERTFILE, cafile) != LDAP_OPT_SUCCESS) ||
	    ldap_set_option(NULL, LDAP_OPT_X_TLS_NEWCTX, &zero) != LDAP_OPT_SUCCESS) {
		fprintf(stderr, "loadgen: cannot set up TLS (CA file %s)\n", cafile ? cafile : "(none)");
		return 2;
	}

	signal(SIGALRM, watchdog);
	alarm((unsigned)(warmup + duration + op_timeout + 15));

	workers = calloc((size_t)conns, sizeof *workers);
	double t0 = now();
	t_window_start = t0 + warmup;
	t_window_end = t_window_start + duration;
	for (int i = 0; i < conns; i++) {
		workers[i].seed = (uint64_t)getpid() * 0x100000001B3ULL ^ (uint64_t)(t0 * 1e6) ^
		                  ((uint64_t)(i + 1) << 40);
		if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0) {
			perror("loadgen: pthread_create");
			return 2;
		}
	}
	sleep_until(t_window_start);
	double cpu_start = cpu_seconds();
	uint64_t rx_start = rx_bytes_now();
	printf("#window-start\n");
	fflush(stdout);
	sleep_until(t_window_end);
	double cpu_end = cpu_seconds();
	uint64_t rx_end = rx_bytes_now();
	printf("#window-end\n");
	fflush(stdout);
	stopping = 1;

	/* let operations in flight finish (bounded by the op timeout), then report */
	int complete = 1;
	double give_up = now() + op_timeout + 2;
	for (int i = 0; i < conns && complete; i++) {
		while (!__atomic_load_n(&workers[i].finished, __ATOMIC_ACQUIRE)) {
			if (now() > give_up) { complete = 0; break; }
			usleep(2000);
		}
	}
	if (complete)
		for (int i = 0; i < conns; i++) pthread_join(workers[i].thread, NULL);
	else
		fprintf(stderr, "loadgen: some workers did not stop; reporting what was measured\n");
	report(complete, cpu_end - cpu_start, duration, rx_end - rx_start);
	if (!complete) _exit(3);
	return 0;
}
