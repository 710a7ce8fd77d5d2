# Per-call latency of the R SDK: log_event and log_metric, p50/p99, with a draining sidecar
# stand-in up (a child Rscript that reads and discards) and with nothing listening.
#
#   Rscript bench/r_sdk.R [calls per case, default 20000]
#
# Uses the package built from sdk_clients/r (sdk_clients/r/dev-load.R: R CMD INSTALL into
# sdk_clients/r/build/ when the sources changed); needs r-base-dev and r-cran-jsonlite. Each
# timing is of the public call as a user makes it, garbage collections included.

args <- commandArgs(trailingOnly = TRUE)
calls <- if (length(args)) as.integer(args[[1]]) else 20000L
script <- normalizePath(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)[[1]]))
source(file.path(dirname(script), "..", "sdk_clients", "r", "dev-load.R"))
suppressPackageStartupMessages(
  library(monitoringsdk, lib.loc = monitoringsdk_dev_lib(file.path(dirname(script), "..", "sdk_clients", "r"))))

free_port <- function() {
  repeat {
    port <- sample(20000:60000, 1)
    srv <- tryCatch(serverSocket(port), error = function(e) NULL)
    if (!is.null(srv)) { close(srv); return(port) }
  }
}

drain_code <- 'a <- commandArgs(TRUE); srv <- serverSocket(as.integer(a[[1]]));
  invisible(file.create(a[[2]])); con <- socketAccept(srv, blocking = TRUE, open = "a+b", timeout = 120)
  repeat { x <- readBin(con, "raw", 1048576L); if (!length(x)) break }'

measure <- function(mon, what) {
  f <- if (what == "log_event") function(i) log_event(mon, "info", "row batch loaded", list(batch = "b-1"))
       else function(i) log_metric(mon, "rows_loaded", i, "count", list(table = "orders"))
  for (i in seq_len(1000)) f(i)  # warm up (byte compilation, caches)
  t <- numeric(calls)
  clock <- function() as.double(Sys.time())
  for (i in seq_len(calls)) {
    t0 <- clock()
    f(i)
    t[i] <- clock() - t0
  }
  quantile(t, c(0.5, 0.99), names = FALSE) * 1e6
}

rows <- list()
port <- free_port()
ready <- tempfile()
Sys.setenv(MONITORING_SIDECAR = sprintf("127.0.0.1:%d", port))
system2(file.path(R.home("bin"), "Rscript"), c("-e", shQuote(drain_code), port, ready), wait = FALSE)
deadline <- Sys.time() + 20
while (!file.exists(ready) && Sys.time() < deadline) Sys.sleep(0.05)
mon <- monitoring_client("bench", on_error = function(problem) NULL)
for (what in c("log_event", "log_metric")) rows[[length(rows) + 1]] <- c("sidecar up", what, measure(mon, what))
up_stats <- statistics(mon)
invisible(close(mon))

Sys.setenv(MONITORING_SIDECAR = sprintf("127.0.0.1:%d", free_port()))
mon <- monitoring_client("bench", on_error = function(problem) NULL)
for (what in c("log_event", "log_metric")) rows[[length(rows) + 1]] <- c("sidecar down", what, measure(mon, what))
down_stats <- statistics(mon)
invisible(close(mon, timeout = 0))

cat(sprintf("R SDK per-call latency, %d calls per case (%s; load average %s)\n", calls, R.version.string,
            tryCatch(strsplit(readLines("/proc/loadavg"), " ")[[1]][1], error = function(e) "?")))
cat(sprintf("%-14s %-12s %9s %9s\n", "case", "call", "p50 us", "p99 us"))
for (r in rows) cat(sprintf("%-14s %-12s %9.1f %9.1f\n", r[1], r[2], as.double(r[3]), as.double(r[4])))
cat(sprintf("sidecar up: sent %d, dropped %d; sidecar down: dropped %d, connection attempts made at backoff times only\n",
            as.integer(up_stats$sent), as.integer(up_stats$dropped), as.integer(down_stats$dropped)))
