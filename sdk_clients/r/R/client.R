# Thin client for the monitoring sidecar (wire protocol v1, JSON lines over TCP).
#
# R has no cheap threads, so, like the Perl SDK, each call encodes its message into a bounded
# in-process buffer and then writes what a non-blocking socket accepts at that moment. There is
# no timer: a backlog drains on later calls, on flush() and on close(). No call stops the R
# session: every public function runs its work inside tryCatch and reports problems through
# one warning per kind (or the on_error hook), then only counts them.

.BACKOFF_MIN <- 0.1
.BACKOFF_MAX <- 30
# Largest single write. A socket reported writable has at least about a third of its send
# buffer (>= 16 KiB on Linux) free, so a write this small is taken whole: R's writeBin() does
# not say how much of a partial write went out, and a guess would duplicate or garble lines.
.CHUNK <- 2048L
.PUMP_BUDGET <- 65536L  # bytes one API call writes at most while draining a backlog
.LEVELS <- c(warn = "warning")
.TRACEPARENT_RE <- "^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$"

.live <- new.env(parent = emptyenv())  # ids and the timestamp cache
.live$ts_sec <- -1

monitoring_client <- function(source = NULL, host = "localhost", port = 17000L,
                              max_messages = 10000L, max_bytes = 8 * 1024^2,
                              max_message_bytes = 1024^2, flush_timeout = 2,
                              connect_timeout = NULL, on_error = NULL) {
  self <- new.env(parent = emptyenv())
  class(self) <- "monitoring_client"
  self$on_error <- on_error
  self$warned <- character()
  self$errors <- 0
  env_source <- Sys.getenv("MONITORING_SOURCE")
  if (nzchar(env_source)) source <- env_source
  if (is.null(source) || !length(source) || is.na(source[[1]])) source <- .script_name()
  self$source <- as.character(source[[1]])
  self$source_json <- .json_str(self$source)
  self$host <- as.character(host)
  self$port <- as.integer(port)
  sidecar <- Sys.getenv("MONITORING_SIDECAR")
  if (nzchar(sidecar)) {
    m <- regmatches(sidecar, regexec("^\\[?([^][]*?)\\]?:([0-9]+)$", sidecar))[[1]]
    if (length(m) == 3L) {
      self$host <- if (nzchar(m[2])) m[2] else "localhost"
      self$port <- as.integer(m[3])
    } else {
      .problem(self, "config", sprintf("ignoring MONITORING_SIDECAR='%s': expected host:port", sidecar))
    }
  }
  # R's connect waits whole seconds or not at all: a sidecar on this host answers at once, a
  # remote one needs the smallest real wait, 1 s, paid only at backoff times.
  loopback <- grepl("^(localhost|127\\.[0-9.]+)$", self$host)
  self$connect_timeout <- as.integer(if (is.null(connect_timeout)) if (loopback) 0L else 1L
                                     else connect_timeout)
  self$max_messages <- as.integer(max_messages)
  self$max_bytes <- as.double(max_bytes)
  self$max_message_bytes <- as.double(max_message_bytes)
  self$flush_timeout <- as.double(flush_timeout)
  self$context <- list()
  self$context_json <- NULL
  self$remote <- NULL
  self$spans <- list()
  .inbound(self)
  .reset_io(self)
  reg.finalizer(self, function(e) close.monitoring_client(e), onexit = TRUE)
  self
}

.script_name <- function() {
  file <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(file)) basename(file[[1]]) else "R"
}

# Fresh buffer, counters and no socket: at construction and in a forked child.
.reset_io <- function(self) {
  self$pid <- Sys.getpid()
  # Raw vectors in numbered slots of an environment, oldest at `head`: assigning into a list
  # held by an environment copies the whole list, an environment slot is O(1).
  self$ring <- new.env(parent = emptyenv(), size = 29L)
  self$head <- 1L
  self$n <- 0L
  self$qbytes <- 0
  # Bytes being written ahead of the buffer: a drop report (with its counts) or a message
  # too large for one write, taken out of the buffer so that dropping the oldest stays O(1).
  self$front <- NULL
  self$front_off <- 0L
  self$front_counts <- NULL
  self$pending_drops <- c(buffer_full = 0, too_large = 0, unsent_at_close = 0)
  self$dropped <- self$pending_drops
  self$sent <- 0
  self$connects <- 0
  self$con <- NULL
  self$next_try <- 0
  self$backoff <- .BACKOFF_MIN
  self$closed <- FALSE
  self$io <- FALSE
}

# Runs an API call's body: nothing escapes into the host program except an interrupt. One
# tryCatch per call (it is most of a call's fixed cost): an error raised while the socket is in
# use (self$io) fails the connection, any other fails the call.
.guard <- function(self, what, expr, value = invisible(NULL)) {
  tryCatch({
    if (self$pid != Sys.getpid()) .after_fork(self)
    expr
  }, error = function(e) {
    if (isTRUE(self$io)) {
      self$io <- FALSE
      .fail(self, sprintf("connection to the sidecar lost: %s", conditionMessage(e)))
      return(value)
    }
    self$errors <- self$errors + 1
    .problem(self, "call", sprintf("%s failed: %s", what, conditionMessage(e)))
    value
  })
}

log_event <- function(mon, level, message, context = NULL) {
  .guard(mon, "log_event", {
    level <- tolower(as.character(level)[[1]])
    if (!is.na(.LEVELS[level])) level <- .LEVELS[[level]]
    s <- .json_str(c(level, as.character(message)[[1]]))
    .emit(mon, "event", paste0('{"level":', s[[1]], ',"message":', s[[2]], "}"), context)
    invisible(NULL)
  })
}

log_metric <- function(mon, name, value, unit = NULL, tags = NULL) {
  .guard(mon, "log_metric", {
    value <- .json_num(.finite(value, "value"))
    has_unit <- !is.null(unit) && !is.na(unit[[1]])
    strings <- c(as.character(name)[[1]], if (has_unit) as.character(unit)[[1]])
    if (length(tags)) {
      if (is.null(names(tags)) || any(!nzchar(names(tags)))) stop("tags must be named", call. = FALSE)
      values <- unlist(tags, use.names = FALSE)
      if (!is.character(values) || length(values) != length(tags) || anyNA(values))
        values <- vapply(as.list(tags), function(v) if (length(v) && !is.na(v[[1]])) as.character(v[[1]]) else "", "")
      strings <- c(strings, names(tags), values)
    }
    s <- .json_str(strings)  # one escaper call for every string of the message
    data <- paste0('{"name":', s[[1]], ',"value":', value, if (has_unit) paste0(',"unit":', s[[2]]))
    if (length(tags)) {
      k <- length(tags)
      first <- 2L + has_unit
      data <- paste0(data, ',"tags":{', paste0(s[first:(first + k - 1L)], ":", s[(first + k):(first + 2L * k - 1L)],
                                              collapse = ","), "}")
    }
    .emit(mon, "metric", paste0(data, "}"))
    invisible(NULL)
  })
}

log_progress <- function(mon, job_id, percent, status = "running") {
  .guard(mon, "log_progress", {
    .emit(mon, "progress", .json_object(
      c("job_id", "percent", "status"),
      c(.json_str(as.character(job_id)[[1]]), .json_num(.finite(percent, "percent")),
        .json_str(as.character(status)[[1]]))))
    invisible(NULL)
  })
}

log_resource <- function(mon, cpu = NULL, memory = NULL, disk = NULL, network = NULL) {
  .guard(mon, "log_resource", {
    values <- list(cpu_percent = cpu, memory_mb = memory, disk_io_mb = disk, network_io_mb = network)
    values <- values[!vapply(values, function(v) is.null(v) || (length(v) == 1L && is.na(v)), TRUE)]
    nums <- vapply(names(values), function(k) .finite(values[[k]], k), 0)
    .emit(mon, "resource", .json_object(names(nums), .json_num(nums)))
    invisible(NULL)
  })
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
    mon$spans[[length(mon$spans) + 1L]] <- span
    .export_traceparent(mon)
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
    .export_traceparent(mon)
    duration_ms <- round((as.double(Sys.time()) - span$t0) * 1000, 3)
    .emit(mon, "span", .json_object(
      c("name", "phase", "status", "duration_ms"),
      c(.json_str(c(span$name, "end", as.character(status)[[1]])), .json_num(duration_ms))), span = span)
    invisible(NULL)
  })
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
    mon$context_json <- if (length(mon$context)) .json_value(mon$context) else NULL
    if (is.null(mon$context_json)) Sys.unsetenv("MONITORING_CONTEXT")
    else Sys.setenv(MONITORING_CONTEXT = mon$context_json)
    invisible(NULL)
  })
}

# base::flush() takes no timeout, so the package has its own generic; connections still
# reach base::flush() through the default method.
flush <- function(con, ...) UseMethod("flush")

flush.default <- function(con, ...) base::flush(con)

flush.monitoring_client <- function(con, timeout = NULL, ...) {
  self <- con
  .guard(self, "flush", {
    deadline <- as.double(Sys.time()) + (if (is.null(timeout)) self$flush_timeout else timeout)
    attempted <- FALSE
    while (.backlog(self)) {
      left <- deadline - as.double(Sys.time())
      if (left <= 0) break
      if (is.null(self$con)) {
        if (attempted || !.connect(self)) break  # one attempt, whatever the backoff says
        attempted <- TRUE
      }
      .pump(self, budget = Inf, wait = min(left, 0.05))
    }
    !.backlog(self)
  }, value = FALSE)
}

close.monitoring_client <- function(con, timeout = NULL, ...) {
  self <- con
  .guard(self, "close", {
    ok <- flush.monitoring_client(self, timeout)
    .disconnect(self)
    if (self$n > 0) .count_drop(self, "unsent_at_close", self$n)
    self$ring <- new.env(parent = emptyenv(), size = 29L)
    self$head <- 1L
    self$n <- 0L
    self$qbytes <- 0
    self$next_try <- 0
    self$closed <- TRUE
    ok
  }, value = FALSE)
}

close_client <- function(mon, timeout = NULL) close.monitoring_client(mon, timeout)

statistics <- function(mon) {
  if (mon$pid != Sys.getpid()) .after_fork(mon)
  list(queued = mon$n, queued_bytes = mon$qbytes, sent = mon$sent, dropped = sum(mon$dropped),
       dropped_by_reason = as.list(mon$dropped), connects = mon$connects,
       reconnects = max(0, mon$connects - 1), errors = mon$errors, connected = !is.null(mon$con))
}

print.monitoring_client <- function(x, ...) {
  cat(sprintf("<monitoring_client %s -> %s:%d, %d queued, %s>\n", x$source, x$host, x$port, x$n,
              if (is.null(x$con)) "not connected" else "connected"))
  invisible(x)
}

# -- message building ------------------------------------------------------------------------

# (trace_id, span_id) of the innermost active span, else the remote parent from TRACEPARENT.
.current <- function(self) {
  n <- length(self$spans)
  if (n) return(c(self$spans[[n]]$trace, self$spans[[n]]$id))
  self$remote
}

.export_traceparent <- function(self) {
  current <- .current(self)
  if (is.null(current)) Sys.unsetenv("TRACEPARENT")
  else Sys.setenv(TRACEPARENT = sprintf("00-%s-%s-01", current[[1]], current[[2]]))
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
      self$context_json <- if (length(parsed)) .json_value(parsed) else NULL
    } else {
      .problem(self, "config", "ignoring MONITORING_CONTEXT: not a JSON object")
    }
  }
}

# The envelope around already encoded data. Its keys are constants and the values that are not
# escaped are the SDK's own (type, timestamp, hex ids checked at their source); everything that
# comes from the caller has been through the escaper.
.emit <- function(self, type, data, context = NULL, span = NULL) {
  ids <- ""
  if (!is.null(span)) {
    ids <- paste0(',"trace_id":"', span$trace, '","span_id":"', span$id, '"',
                  if (!is.null(span$parent)) paste0(',"parent_span_id":"', span$parent, '"'))
  } else if (length(self$spans)) {
    span <- self$spans[[length(self$spans)]]
    ids <- paste0(',"trace_id":"', span$trace, '","span_id":"', span$id, '"')
  } else if (!is.null(self$remote)) {
    ids <- paste0(',"trace_id":"', self$remote[[1]], '","span_id":"', self$remote[[2]], '"')
  }
  ctx <- if (length(context)) .merge_context(self, context) else self$context_json
  line <- paste0('{"source":', self$source_json, ',"type":"', type, '","timestamp":"', .timestamp(), '"',
                 ids, if (!is.null(ctx)) paste0(',"context":', ctx), ',"data":', data, "}\n")
  self$closed <- FALSE
  bytes <- charToRaw(line)
  # The common case: nothing waiting and the socket has room. Writing the line at once skips the
  # buffer's bookkeeping (about a third of a call); anything else goes through the buffer.
  if (self$n == 0L && is.null(self$front) && !is.null(self$con) && length(bytes) <= .CHUNK &&
      !any(self$pending_drops > 0) && .write_now(self, bytes)) {
    return(invisible(NULL))
  }
  .enqueue(self, bytes)
  .pump(self)
}

# One small message written now if the socket is writable and has nothing to say; FALSE (and the
# message not written) otherwise, or when the write fails, so that the caller buffers it.
.write_now <- function(self, bytes) {
  con <- self$con
  ready <- socketSelect(list(con, con), write = c(FALSE, TRUE), timeout = 0)
  if (ready[[1]] || !ready[[2]]) return(FALSE)
  written <- tryCatch({
    withCallingHandlers(writeBin(bytes, con), warning = .write_failed)
    TRUE
  }, error = function(e) {
    .fail(self, sprintf("connection to the sidecar lost: %s", conditionMessage(e)))
  })
  if (written) self$sent <- self$sent + 1
  written
}

# The context of set_context() with a call's own (the call wins), encoded.
.merge_context <- function(self, context) {
  keys <- names(context)
  if (is.null(keys) || any(!nzchar(keys))) stop("context must be named", call. = FALSE)
  values <- unlist(context, use.names = FALSE)
  if (!is.character(values) || length(values) != length(keys) || anyNA(values) ||
      any(keys %in% names(self$context))) {
    merged <- self$context
    context <- as.list(context)
    for (k in keys) merged[k] <- list(context[[k]])
    return(.json_value(merged))
  }
  # common case: new keys with string values, appended to the cached encoding
  own <- paste0(.json_str(keys), ":", .json_str(values), collapse = ",")
  if (is.null(self$context_json)) paste0("{", own, "}")
  else paste0(substr(self$context_json, 1L, nchar(self$context_json) - 1L), ",", own, "}")
}

# RFC 3339 UTC with milliseconds; the date and time part is formatted once per second.
.timestamp <- function() {
  now <- unclass(Sys.time())
  sec <- now %/% 1
  if (sec != .live$ts_sec) {
    .live$ts_sec <- sec
    .live$ts_prefix <- format(.POSIXct(sec, tz = "UTC"), "%Y-%m-%dT%H:%M:%S")
  }
  sprintf("%s.%03dZ", .live$ts_prefix, as.integer((now - sec) * 1000))
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

# -- buffer ----------------------------------------------------------------------------------

.enqueue <- function(self, bytes) {
  size <- length(bytes)
  if (size > self$max_message_bytes || size > self$max_bytes) return(.count_drop(self, "too_large", 1))
  while (self$n > 0L && (self$n >= self$max_messages || self$qbytes + size > self$max_bytes)) {
    .pop(self)
    .count_drop(self, "buffer_full", 1)
  }
  n <- self$n
  self$ring[[as.character((self$head + n - 1L) %% self$max_messages + 1L)]] <- bytes
  self$n <- n + 1L
  self$qbytes <- self$qbytes + size
}

.push <- function(self, bytes, front = FALSE) {
  cap <- self$max_messages
  if (front) self$head <- (self$head - 2L) %% cap + 1L
  self$ring[[as.character(if (front) self$head else (self$head + self$n - 1L) %% cap + 1L)]] <- bytes
  self$n <- self$n + 1L
  self$qbytes <- self$qbytes + length(bytes)
}

# Removes and returns the oldest message.
.pop <- function(self) {
  slot <- as.character(self$head)
  bytes <- self$ring[[slot]]
  self$ring[[slot]] <- NULL
  self$head <- self$head %% self$max_messages + 1L
  self$n <- self$n - 1L
  self$qbytes <- self$qbytes - length(bytes)
  bytes
}

.count_drop <- function(self, reason, count) {
  if (!self$pending_drops[[reason]])
    .problem(self, reason, sprintf("dropping messages (%s); they are counted and reported to the sidecar", reason))
  self$pending_drops[[reason]] <- self$pending_drops[[reason]] + count
  self$dropped[[reason]] <- self$dropped[[reason]] + count
  invisible(NULL)
}

.backlog <- function(self) self$n > 0L || !is.null(self$front)

# The drop counts, as metric messages written before anything else once a connection is up.
.prepare_report <- function(self) {
  counts <- self$pending_drops[self$pending_drops > 0]
  lines <- vapply(names(counts), function(reason) paste0(.json_object(
    c("source", "type", "timestamp", "data"),
    c(self$source_json, .json_str(c("metric", .timestamp())),
      .json_object(c("name", "value", "unit", "tags"),
                   c(.json_str("sdk.dropped_messages"), .json_num(counts[[reason]]), .json_str("count"),
                     .json_object("reason", .json_str(reason)))))), "\n"), "")
  self$front <- charToRaw(paste(lines, collapse = ""))
  self$front_off <- 0L
  self$front_counts <- counts
  self$pending_drops[] <- 0
}

# -- socket ----------------------------------------------------------------------------------

.connect <- function(self) {
  con <- tryCatch(suppressWarnings(socketConnection(
    self$host, self$port, blocking = FALSE, open = "a+b", timeout = self$connect_timeout)),
    error = function(e) e)
  if (inherits(con, "error")) {
    return(.fail(self, sprintf("cannot connect to %s:%d", self$host, self$port)))
  }
  self$con <- con
  self$backoff <- .BACKOFF_MIN
  self$connects <- self$connects + 1
  TRUE
}

.disconnect <- function(self) {
  con <- self$con
  self$con <- NULL
  if (!is.null(con)) tryCatch(close(con), error = function(e) NULL, warning = function(w) NULL)
  # A half-sent message goes back to the front of the buffer, to be sent whole on the next
  # connection; a half-sent report's counts go back to the pending ones.
  front <- self$front
  counts <- self$front_counts
  self$front <- NULL
  self$front_counts <- NULL
  if (is.null(front)) return()
  if (!is.null(counts)) {
    for (r in names(counts)) self$pending_drops[[r]] <- self$pending_drops[[r]] + counts[[r]]
  } else if (self$n < self$max_messages && self$qbytes + length(front) <= self$max_bytes) {
    .push(self, front, front = TRUE)
  } else {
    .count_drop(self, "buffer_full", 1)
  }
}

.fail <- function(self, why) {
  .disconnect(self)
  self$next_try <- unclass(Sys.time()) + self$backoff
  self$backoff <- min(self$backoff * 2, .BACKOFF_MAX)
  .problem(self, "connection", why)
  FALSE
}

# Opportunistic I/O: connect when the backoff allows, then write what the socket takes now
# (up to `budget` bytes, waiting up to `wait` seconds for room). Runs inside .guard(): an
# error while self$io is set (a SIGPIPE, which R turns into an error, or a failed write turned
# into one below) fails the connection.
.pump <- function(self, budget = .PUMP_BUDGET, wait = 0) {
  if (is.null(self$con)) {
    if (unclass(Sys.time()) < self$next_try || !.connect(self)) return(FALSE)
  }
  con <- self$con
  self$io <- TRUE
  ready <- socketSelect(list(con, con), write = c(FALSE, TRUE), timeout = 0)
  if (ready[[1]]) {
    # The sidecar only talks to refuse a stream: readable means EOF, a reset or an error line.
    said <- suppressWarnings(readBin(con, "raw", 4096L))
    if (!length(said) && !isIncomplete(con)) {
      self$io <- FALSE
      return(.fail(self, "the sidecar closed the connection"))
    }
    if (length(said)) .problem(self, "sidecar", paste("sidecar said:", rawToChar(said[said != 0])))
  }
  if (is.null(self$front) && any(self$pending_drops > 0)) .prepare_report(self)
  writable <- ready[[2]]
  written <- 0
  while (.backlog(self) && written < budget) {
    if (!writable) {
      if (wait <= 0 || !socketSelect(list(con), write = TRUE, timeout = wait)) break
    }
    chunk <- .next_chunk(self)
    # writeBin() only warns when send() fails (and then nothing of the chunk went out)
    withCallingHandlers(writeBin(chunk, con), warning = .write_failed)
    .consume(self, length(chunk))
    written <- written + length(chunk)
    writable <- .backlog(self) && socketSelect(list(con), write = TRUE, timeout = 0)
  }
  self$io <- FALSE
  TRUE
}

.write_failed <- function(w) stop(conditionMessage(w), call. = FALSE)

# Up to .CHUNK bytes from the front: the rest of what is being written ahead of the buffer,
# else as many whole messages as fit (a larger message first moves ahead of the buffer).
.next_chunk <- function(self) {
  first <- self$ring[[as.character(self$head)]]
  if (is.null(self$front) && length(first) > .CHUNK) {
    self$front <- .pop(self)
    self$front_off <- 0L
  }
  if (!is.null(self$front)) {
    return(self$front[(self$front_off + 1L):min(length(self$front), self$front_off + .CHUNK)])
  }
  if (self$n == 1L) return(first)
  cap <- self$max_messages
  parts <- list(first)
  size <- length(first)
  k <- 1L
  while (k < self$n) {
    nxt <- self$ring[[as.character((self$head + k - 1L) %% cap + 1L)]]
    size <- size + length(nxt)
    if (size > .CHUNK) break
    k <- k + 1L
    parts[[k]] <- nxt
  }
  if (k == 1L) first else unlist(parts, use.names = FALSE)
}

# Accounts for `size` bytes written from the front.
.consume <- function(self, size) {
  if (!is.null(self$front)) {
    self$front_off <- self$front_off + size
    if (self$front_off >= length(self$front)) {
      if (is.null(self$front_counts)) self$sent <- self$sent + 1
      self$front <- NULL
      self$front_counts <- NULL
    }
    return()
  }
  while (size > 0) {
    size <- size - length(.pop(self))
    self$sent <- self$sent + 1
  }
}

# A forked child must not write into its parent's stream nor resend its parent's buffer; spans
# and context are kept, so it stays in the same trace.
.after_fork <- function(self) {
  if (!is.null(self$con)) tryCatch(close(self$con), error = function(e) NULL, warning = function(w) NULL)
  self$con <- NULL
  errors <- self$errors
  .reset_io(self)
  self$errors <- errors
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
