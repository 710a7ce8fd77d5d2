# The C fast path (src/monitoringsdk.c) against R's general path and jsonlite.

strip_ts <- function(lines) sub('"timestamp":"[^"]*"', '"timestamp":"T"', lines)

test_that("the escaper is jsonlite's, with text as UTF-8", {
  escape <- get("C_escape_chars", envir = asNamespace("jsonlite"))
  ascii <- vapply(1:127, function(i) rawToChar(as.raw(i)), "")
  utf8 <- enc2utf8(c("caf\u00e9", "\u2028\u2029", "\U0001F600", "\u65e5\u672c", "a\"b\\c/d\u007f", ""))
  x <- c(ascii, utf8, paste(ascii, collapse = ""))
  expect_identical(monitoringsdk:::.json_str(x), .Call(escape, x))
  expect_identical(monitoringsdk:::.json_str(NA_character_), "null")
  latin1 <- "caf\xe9"
  Encoding(latin1) <- "latin1"
  expect_identical(monitoringsdk:::.json_str(latin1), "\"caf\u00e9\"")
  bad <- "a\xff\xc3b\xed\xa0\x80"  # a stray byte, a cut sequence, a surrogate: one U+FFFD per byte
  Encoding(bad) <- "bytes"
  expect_identical(monitoringsdk:::.json_str(bad), paste0("\"a", strrep("\ufffd", 2), "b", strrep("\ufffd", 3), "\""))
  expect_true(validUTF8(monitoringsdk:::.json_str(bad)))
})

test_that("numbers read back exactly", {
  x <- c(0, 1, -3, 10000, 1e20, 1e-07, 0.1 + 0.2, 1 / 3, 123456.789, -0.25, NaN, Inf)
  out <- monitoringsdk:::.json_num(x)
  expect_identical(out[1:5], c("0", "1", "-3", "10000", "1e+20"))
  expect_identical(as.double(out[1:10]), x[1:10])
  expect_identical(out[11:12], c("null", "null"))
})

test_that("the fast path and the general path send the same bytes", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  set_context(mon, "job_id", "job-1")
  # each pair: plain arguments (C) and the same values in forms only R handles
  log_event(mon, "WARN", "m\u00e9", list(file = "a.csv"))
  log_event(mon, factor("WARN"), factor("m\u00e9"), list(file = factor("a.csv")))
  log_event(mon, "info", "x", c(a = "1", b = "2"))
  log_event(mon, "info", "x", list(a = "1", b = 2))
  log_metric(mon, "rows", 5L, "count", c(table = "orders"))
  log_metric(mon, factor("rows"), "5", factor("count"), list(table = factor("orders")))
  log_metric(mon, "rows", 5, NA, list(table = "orders"))
  log_metric(mon, "rows", 5, NA_character_, list(table = factor("orders")))
  log_event(mon, NA, NA)
  log_event(mon, NA_character_, factor(NA))
  collect(s, mon, 10)
  lines <- strip_ts(s$lines)
  expect_length(lines, 10)
  expect_identical(lines[c(1, 5, 7, 9)], lines[c(2, 6, 8, 10)])
  expect_identical(sub('"b":2', '"b":"2"', lines[[4]], fixed = TRUE), lines[[3]])
  expect_match(lines[[1]], '"context":{"job_id":"job-1","file":"a.csv"},"data":{"level":"warning","message":"m\u00e9"}',
               fixed = TRUE)
  expect_equal(statistics(mon)$errors, 0)
  close(mon)
})

test_that("a message too large is dropped, counted and reported", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port, max_message_bytes = 1000)
  log_event(mon, "info", strrep("x", 2000))
  log_event(mon, "info", "small")
  got <- collect(s, mon, 2)
  expect_equal(statistics(mon)$dropped_by_reason$too_large, 1)
  expect_equal(got[[1]]$data, list(name = "sdk.dropped_messages", value = 1L, unit = "count",
                                   tags = list(reason = "too_large")))
  expect_equal(got[[2]]$data$message, "small")
  close(mon)
})

test_that("host names resolve, localhost included", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  Sys.setenv(MONITORING_SIDECAR = sprintf("localhost:%d", s$port))
  mon <- monitoring_client("by-name", on_error = function(m) NULL)
  log_event(mon, "info", "x")
  got <- collect(s, mon, 1)
  expect_equal(got[[1]]$source, "by-name")
  close(mon)
})

test_that("what the sidecar says is reported, and its hang-up noticed before the next write", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  said <- character()
  Sys.setenv(MONITORING_SIDECAR = sprintf("127.0.0.1:%d", s$port))
  mon <- monitoring_client("talk", on_error = function(m) said <<- c(said, m))
  log_event(mon, "info", "one")
  collect(s, mon, 1)
  writeBin(charToRaw("protocol error\n"), s$conns[[1]])
  drop_connections(s)
  Sys.sleep(0.05)
  log_event(mon, "info", "two")
  expect_true(any(grepl("sidecar said: protocol error", said, fixed = TRUE)))
  expect_true(any(grepl("closed the connection", said, fixed = TRUE)))
  got <- collect(s, mon, 2)
  expect_equal(vapply(got, function(m) m$data$message, ""), c("one", "two"))
  close(mon)
})

test_that("after a stall, every line arrives whole and in order, the sent count exact", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port, max_messages = 500)
  payload <- strrep("z", 3000)
  log_event(mon, "info", "0")
  poll_server(s, read = FALSE)  # accepted, not read yet: the kernel's buffers fill, writes are cut
  for (i in 1:2000) log_event(mon, "info", sprintf("%d %s", i, payload))
  expect_gt(statistics(mon)$dropped, 0)
  collect(s, mon, 1e9, timeout = 3)  # now read everything
  expect_true(flush(mon, 5))
  poll_server(s)
  got <- lapply(s$lines, jsonlite::fromJSON, simplifyVector = FALSE)  # each line is whole JSON
  events <- Filter(function(m) m$type == "event", got)
  seq <- as.integer(sub(" .*", "", vapply(events, function(m) m$data$message, "")))
  expect_false(is.unsorted(seq, strictly = TRUE))
  expect_equal(length(events), statistics(mon)$sent)
  st <- statistics(mon)
  expect_equal(length(events) + st$dropped, 2001)
  close(mon)
})

test_that("a forked child neither writes into its parent's stream nor resends its buffer", {
  skip_on_os("windows")
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  log_event(mon, "info", "parent-1")
  collect(s, mon, 1)
  job <- parallel::mcparallel({
    log_event(mon, "info", "child")
    flush(mon, 2)
    statistics(mon)$sent
  })
  child_sent <- parallel::mccollect(job)[[1]]
  log_event(mon, "info", "parent-2")
  got <- collect(s, mon, 3)
  expect_equal(child_sent, 1)
  expect_setequal(vapply(got, function(m) m$data$message, ""), c("parent-1", "child", "parent-2"))
  expect_length(s$conns, 2)
  expect_equal(statistics(mon)$sent, 2)
  close(mon)
})

test_that("without flush, a lone message goes out at once and a burst's tail within ~200 ms", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  wait_lines <- function(n, timeout) {
    t0 <- Sys.time()
    while (length(s$lines) < n && Sys.time() - t0 < timeout) { poll_server(s); Sys.sleep(0.002) }
    as.double(Sys.time() - t0, units = "secs")
  }
  log_event(mon, "info", "connect")
  wait_lines(1, 2)
  Sys.sleep(0.02)
  log_event(mon, "info", "lone")  # the last push was long ago: pushed now
  expect_lt(wait_lines(2, 2), 0.1)
  for (i in 1:50) log_event(mon, "info", sprintf("burst %d", i))  # held by the kernel, then sent by its timer
  expect_lt(wait_lines(52, 2), 0.6)
  expect_length(s$lines, 52)
  for (i in 1:10) log_event(mon, "info", sprintf("before the error %d", i))
  log_event(mon, "ERROR", "disk full")  # urgent: pushed out with all held before it, not left to the timer
  expect_lt(wait_lines(63, 2), 0.15)  # the kernel timer alone would take ~200 ms
  expect_equal(jsonlite::fromJSON(s$lines[[63]])$data$level, "error")
  close(mon)
})
