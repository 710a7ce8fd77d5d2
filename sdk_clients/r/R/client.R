# Thin client for the monitoring sidecar (wire protocol v1, JSON lines over TCP or a Unix socket).
#
# R has no cheap threads, so, like the Perl SDK, each call encodes its message into a bounded
# in-process buffer and then writes what a non-blocking socket accepts at that moment. There is
# no timer: a backlog drains on later calls, on flush() and on close().
#
# The hot path is C (src/monitoringsdk.c): log_event() and log_metric() are one .Call that
# builds the line, writes it or buffers it, and allocates no R objects, so that a call costs a
# few microseconds and R's garbage collector has nothing to do. The C side returns NULL when
# done, TRUE when done with problems to report, and FALSE when an argument is not of the simple
# kinds it handles; then the general path below runs, in R, under tryCatch.
#
# No call stops the R session: problems are reported through one warning per kind (or the
# on_error hook), then only counted.

.LEVELS <- c(warn = "warning")
.TRACEPARENT_RE <- "^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$"

.live <- new.env(parent = emptyenv())  # the pool of random bytes for ids

monitoring_client <- function(source = NULL, host = "localhost", port = 17000L,
                              max_messages = 10000L, max_bytes = 8 * 1024^2,
                              max_message_bytes = 1024^2, flush_timeout = 2,
                              connect_timeout = 1, on_error = NULL,
                              unix_socket = NULL, token = NULL) {
  self <- new.env(parent = emptyenv())
  class(self) <- "monitoring_client"
  self$on_error <- on_error
  self$warned <- character()
  self$errors <- 0
  env_source <- Sys.getenv("MONITORING_SOURCE")
  if (nzchar(env_source)) source <- env_source
  if (is.null(source) || !length(source) || is.na(source[[1]])) source <- .script_name()
  self$source <- as.character(source[[1]])
  self$host <- as.character(host)
  self$port <- as.integer(port)
  self$unix_socket <- if (length(unix_socket) && !is.na(unix_socket[[1]]) && nzchar(unix_socket[[1]])) as.character(unix_socket[[1]])
  sidecar <- Sys.getenv("MONITORING_SIDECAR")
  if (nzchar(sidecar)) {
    m <- regmatches(sidecar, regexec("^\\[?([^][]*?)\\]?:([0-9]+)$", sidecar))[[1]]
    if (startsWith(sidecar, "unix:") && nchar(sidecar) > 5L) {
      self$unix_socket <- substring(sidecar, 6L)
    } else if (length(m) == 3L) {
      self$host <- if (nzchar(m[2])) m[2] else "localhost"
      self$port <- as.integer(m[3])
      self$unix_socket <- NULL
    } else {
      .problem(self, "config", sprintf("ignoring MONITORING_SIDECAR='%s': expected host:port or unix:/path", sidecar))
    }
  }
  env_token <- Sys.getenv("MONITORING_SIDECAR_TOKEN")
  if (nzchar(env_token)) token <- env_token
  self$flush_timeout <- as.double(flush_timeout)
  self$context <- list()
  self$remote <- NULL
  self$spans <- list()
  self$ptr <- .Call(C_new, self$host, self$port, as.integer(max_messages), as.double(max_bytes),
                    as.double(max_message_bytes), as.double(if (is.null(connect_timeout)) 1 else connect_timeout),
                    !l10n_info()[["UTF-8"]] && isTRUE(l10n_info()[["Latin-1"]]))
  .Call(C_set_source, self, .json_str(self$source))
  # The auth line goes first on every connection; the token is kept nowhere else.
  has_token <- length(token) && !is.na(token[[1]]) && nzchar(token[[1]])
  .Call(C_set_transport, self, self$unix_socket,
        if (has_token) paste0('{"auth":', .json_str(as.character(token[[1]])), "}\n"))
  .inbound(self)
  .context_changed(self)
  .spans_changed(self, export = FALSE)
  reg.finalizer(self, function(e) close.monitoring_client(e), onexit = TRUE)
  self
}

.script_name <- function() {
  file <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(file)) basename(file[[1]]) else "R"
}

# Runs the general path of an API call: nothing escapes into the host program except an
# interrupt; an error is counted and reported.
.guard <- function(self, what, expr, value = invisible(NULL)) {
  tryCatch(expr, error = function(e) {
    self$errors <- self$errors + 1
    .problem(self, "call", sprintf("%s failed: %s", what, conditionMessage(e)))
    value
  })
}

log_event <- function(mon, level, message, context = NULL) {
  r <- .Call(C_event, mon, level, message, context)
  if (!is.null(r)) {
    if (r) .report(mon)
    else .guard(mon, "log_event", {
      level <- tolower(as.character(level)[[1]])
      if (!is.na(.LEVELS[level])) level <- .LEVELS[[level]]
      s <- .json_str(c(level, as.character(message)[[1]]))
      .emit(mon, "event", paste0('{"level":', s[[1]], ',"message":', s[[2]], "}"), context)
    })
  }
  invisible(NULL)
}

log_metric <- function(mon, name, value, unit = NULL, tags = NULL) {
  r <- .Call(C_metric, mon, name, value, unit, tags)
  if (!is.null(r)) {
    if (r) .report(mon)
    else .guard(mon, "log_metric", {
      value <- .json_num(.finite(value, "value"))
      has_unit <- !is.null(unit) && !is.na(unit[[1]])
      data <- paste0('{"name":', .json_str(as.character(name)[[1]]), ',"value":', value,
                     if (has_unit) paste0(',"unit":', .json_str(as.character(unit)[[1]])))
      if (length(tags)) {
        if (is.null(names(tags)) || any(!nzchar(names(tags)))) stop("tags must be named", call. = FALSE)
        values <- vapply(as.list(tags), function(v) if (length(v) && !is.na(v[[1]])) as.character(v[[1]]) else "",
                         "", USE.NAMES = FALSE)
        data <- paste0(data, ',"tags":', .json_object(names(tags), .json_str(values)))
      }
      .emit(mon, "metric", paste0(data, "}"))
    })
  }
  invisible(NULL)
}

log_progress <- function(mon, job_id, percent, status = "running") {
  .guard(mon, "log_progress", {
    .emit(mon, "progress", .json_object(
      c("job_id", "percent", "status"),
      c(.json_str(as.character(job_id)[[1]]), .json_num(.finite(percent, "percent")),
        .json_str(as.character(status)[[1]]))))
  })
  invisible(NULL)
}

log_resource <- function(mon, cpu = NULL, memory = NULL, disk = NULL, network = NULL) {
  .guard(mon, "log_resource", {
    values <- list(cpu_percent = cpu, memory_mb = memory, disk_io_mb = disk, network_io_mb = network)
    values <- values[!vapply(values, function(v) is.null(v) || (length(v) == 1L && is.na(v)), TRUE)]
    nums <- vapply(names(values), function(k) .finite(values[[k]], k), 0)
    .emit(mon, "resource", .json_object(names(nums), .json_num(nums)))
  })
  invisible(NULL)
}

.finite <- function(x, what) {
  v <- if (is.numeric(x)) as.double(x[[1]]) else suppressWarnings(as.double(x[[1]]))
  if (length(x) != 1L || !is.finite(v)) stop(sprintf("%s is not a finite number", what), call. = FALSE)
  v
}

start_span <- function(mon, name) {
  .guard(mon, "start_span", {
    span_id <- .random_hex(8L)
    parent <- .current(mon)
    span <- list(id = span_id, trace = if (is.null(parent)) .random_hex(16L) else parent[[1]],
                 parent = if (is.null(parent)) NULL else parent[[2]],
                 name = as.character(name)[[1]], t0 = as.double(Sys.time()))
    # A root span (none of this client's open) owns the context set inside it: it keeps what
    # to return to when it ends, so one job's context never leaks into the next. The context is
    # always a list (possibly empty), so NULL marks a nested span.
    if (!length(mon$spans)) span$context <- mon$context
    mon$spans[[length(mon$spans) + 1L]] <- span
    .spans_changed(mon)
    .emit(mon, "span", .json_object(c("name", "phase"), .json_str(c(span$name, "start"))), span = span)
    span_id
  }, value = NA_character_)
}

end_span <- function(mon, span_id, status = "success") {
  .guard(mon, "end_span", {
    ids <- vapply(mon$spans, function(s) s$id, "")
    i <- which(ids == as.character(span_id)[[1]])
    if (!length(i)) stop(sprintf("no active span with id '%s'", format(span_id)), call. = FALSE)
    i <- i[[length(i)]]
    span <- mon$spans[[i]]
    mon$spans[[i]] <- NULL
    .spans_changed(mon)
    duration_ms <- round((as.double(Sys.time()) - span$t0) * 1000, 3)
    send <- function() .emit(mon, "span", .json_object(
      c("name", "phase", "status", "duration_ms"),
      c(.json_str(c(span$name, "end", as.character(status)[[1]])), .json_num(duration_ms))), span = span)
    # The end message carries the context as it is; a root span's restore comes after it,
    # also when sending failed. Spans still open inside it (ended out of order) do not delay it.
    if (is.null(span$context)) send()
    else tryCatch(send(), finally = {
      mon$context <- span$context
      .export_context(mon)
    })
  })
  invisible(NULL)
}

with_span <- function(mon, name, expr) {
  span_id <- start_span(mon, name)
  ok <- FALSE
  on.exit(end_span(mon, span_id, if (ok) "success" else "error"))
  value <- expr  # evaluated here, in the caller's frame; an error ends the span as "error"
  ok <- TRUE
  value
}

set_context <- function(mon, key, value) {
  .guard(mon, "set_context", {
    key <- as.character(key)[[1]]
    mon$context[[key]] <- if (identical(key, "job_id") && !is.null(value)) as.character(value) else value
    .export_context(mon)
  })
  invisible(NULL)
}

# base::flush() takes no timeout, so the package has its own generic; connections still
# reach base::flush() through the default method.
flush <- function(con, ...) UseMethod("flush")

flush.default <- function(con, ...) base::flush(con)

flush.monitoring_client <- function(con, timeout = NULL, ...) {
  ok <- .guard(con, "flush", .Call(C_flush, con, as.double(if (is.null(timeout)) con$flush_timeout else timeout)),
               value = FALSE)
  .report(con)
  ok
}

close.monitoring_client <- function(con, timeout = NULL, ...) {
  ok <- .guard(con, "close", .Call(C_close, con, as.double(if (is.null(timeout)) con$flush_timeout else timeout)),
               value = FALSE)
  .report(con)
  ok
}

close_client <- function(mon, timeout = NULL) close.monitoring_client(mon, timeout)

statistics <- function(mon) {
  s <- .Call(C_stats, mon)
  dropped <- list(buffer_full = s[[4]], too_large = s[[5]], unsent_at_close = s[[6]])
  list(queued = s[[1]], queued_bytes = s[[2]], sent = s[[3]], dropped = sum(s[4:6]),
       dropped_by_reason = dropped, connects = s[[7]], reconnects = max(0, s[[7]] - 1),
       errors = mon$errors, connected = s[[8]] > 0)
}

print.monitoring_client <- function(x, ...) {
  s <- .Call(C_stats, x)
  where <- if (is.null(x$unix_socket)) sprintf("%s:%d", x$host, x$port) else paste0("unix:", x$unix_socket)
  cat(sprintf("<monitoring_client %s -> %s, %d queued, %s>\n", x$source, where, as.integer(s[[1]]),
              if (s[[8]] > 0) "connected" else "not connected"))
  invisible(x)
}

# -- message building ------------------------------------------------------------------------

# (trace_id, span_id) of the innermost active span, else the remote parent from TRACEPARENT.
.current <- function(self) {
  n <- length(self$spans)
  if (n) return(c(self$spans[[n]]$trace, self$spans[[n]]$id))
  self$remote
}

# The ids every other message carries (kept in the C client), and TRACEPARENT for children.
.spans_changed <- function(self, export = TRUE) {
  current <- .current(self)
  .Call(C_set_ids, self, if (is.null(current)) "" else paste0(',"trace_id":"', current[[1]], '","span_id":"', current[[2]], '"'))
  if (!export) return(invisible(NULL))
  if (is.null(current)) Sys.unsetenv("TRACEPARENT")
  else Sys.setenv(TRACEPARENT = sprintf("00-%s-%s-01", current[[1]], current[[2]]))
}

# The context's encoding (kept in the C client, with its keys); returns it, NULL when empty.
.context_changed <- function(self) {
  json <- if (length(self$context)) .json_value(self$context)
  .Call(C_set_context, self, json, .json_str(as.character(names(self$context))))
  json
}

# The context changed: into the C client, and MONITORING_CONTEXT for children (unset when empty).
.export_context <- function(self) {
  json <- .context_changed(self)
  if (is.null(json)) Sys.unsetenv("MONITORING_CONTEXT")
  else Sys.setenv(MONITORING_CONTEXT = json)
  invisible(NULL)
}

# Propagation from a parent process: its trace and context.
.inbound <- function(self) {
  tp <- tolower(trimws(Sys.getenv("TRACEPARENT")))
  m <- regmatches(tp, regexec(.TRACEPARENT_RE, tp))[[1]]
  if (length(m) == 3L && !startsWith(tp, "ff") && grepl("[1-9a-f]", m[2]) && grepl("[1-9a-f]", m[3])) {
    self$remote <- c(m[2], m[3])
  }
  ctx <- Sys.getenv("MONITORING_CONTEXT")
  if (nzchar(ctx)) {
    parsed <- tryCatch(jsonlite::fromJSON(ctx, simplifyVector = FALSE), error = function(e) NULL)
    if (is.list(parsed) && (length(parsed) == 0L || !is.null(names(parsed)))) {
      self$context <- parsed
    } else {
      .problem(self, "config", "ignoring MONITORING_CONTEXT: not a JSON object")
    }
  }
}

# A message from its encoded data, through the C client, which adds the envelope (source, type,
# timestamp, ids, context) and writes or buffers it. Span messages carry their own ids.
.emit <- function(self, type, data, context = NULL, span = NULL) {
  ids <- if (!is.null(span)) paste0(',"trace_id":"', span$trace, '","span_id":"', span$id, '"',
                                    if (!is.null(span$parent)) paste0(',"parent_span_id":"', span$parent, '"'))
  ctx <- if (length(context)) .merge_context(self, context)
  r <- .Call(C_emit, self, type, data, ctx, ids)
  if (is.null(r)) return(invisible(NULL))
  if (!r) stop("the client's native state is gone (a client restored from a saved session?)", call. = FALSE)
  .report(self)
}

# The context of set_context() with a call's own (the call wins), encoded.
.merge_context <- function(self, context) {
  keys <- names(context)
  if (is.null(keys) || any(!nzchar(keys))) stop("context must be named", call. = FALSE)
  merged <- self$context
  context <- as.list(context)
  for (k in keys) merged[k] <- list(context[[k]])
  .json_value(merged)
}

# Random lowercase hex from the system's generator, so R's own random stream (and a user's
# set.seed()) is left untouched. Bytes are read in blocks; a forked child reads its own.
.random_hex <- function(n) {
  pid <- Sys.getpid()
  if (!identical(.live$pool_pid, pid) || length(.live$pool) < n) {
    .live$pool <- tryCatch({
      urandom <- file("/dev/urandom", "rb", raw = TRUE)
      on.exit(close(urandom))
      readBin(urandom, "raw", 4096L)
    }, error = function(e) raw(), warning = function(w) raw())
    .live$pool_pid <- pid
    if (length(.live$pool) < n) {  # no /dev/urandom: R's generator, its state restored after
      seed <- if (exists(".Random.seed", globalenv())) get(".Random.seed", globalenv())
      .live$pool <- as.raw(sample.int(256L, 4096L, replace = TRUE) - 1L)
      if (is.null(seed)) rm(".Random.seed", envir = globalenv()) else assign(".Random.seed", seed, globalenv())
    }
  }
  bytes <- .live$pool[seq_len(n)]
  .live$pool <- .live$pool[-seq_len(n)]
  if (all(bytes == 0)) bytes[n] <- as.raw(1L)  # all zeros is an invalid W3C id
  paste(as.character(bytes), collapse = "")
}

# -- problems --------------------------------------------------------------------------------

# Reports what the C client recorded (connection lost, dropping started, what the sidecar said).
.report <- function(self) {
  p <- .Call(C_problems, self)
  for (i in seq_len(length(p) %/% 2L)) .problem(self, p[[2L * i - 1L]], p[[2L * i]])
  invisible(NULL)
}

# Warn once per kind of problem, then only count; on_error, when given, sees every one.
.problem <- function(self, kind, text) {
  if (is.function(self$on_error)) {
    tryCatch(self$on_error(text), error = function(e) NULL)
    return(invisible(FALSE))
  }
  if (!(kind %in% self$warned)) {
    self$warned <- c(self$warned, kind)
    tryCatch(warning(sprintf("monitoringsdk(%s): %s (further problems of this kind are counted, not reported)",
                             self$source, text), call. = FALSE),
             error = function(e) NULL)  # options(warn = 2) must not turn this into an error
  }
  invisible(FALSE)
}
