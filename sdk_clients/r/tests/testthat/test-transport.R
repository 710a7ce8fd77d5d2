# A Unix socket in place of host and port, and the ingest token sent first on every connection.

messages_of <- function(lines) vapply(lapply(lines, jsonlite::fromJSON, simplifyVector = FALSE),
                                      function(m) if (is.null(m$data$message)) "" else m$data$message, "")

test_that("a Unix socket, from unix_socket or from MONITORING_SIDECAR=unix:PATH", {
  on.exit(clean_env())
  clean_env()
  u <- unix_capture_server()
  on.exit(stop_unix_server(u), add = TRUE)
  mon <- monitoring_client("unix", host = "10.255.255.1", port = 1L, unix_socket = u$path, on_error = function(msg) NULL)
  log_event(mon, "info", "by argument")
  expect_true(close(mon, 5))
  Sys.setenv(MONITORING_SIDECAR = paste0("unix:", u$path))
  mon <- monitoring_client("unix", host = "10.255.255.1", port = 1L, on_error = function(msg) NULL)
  expect_equal(mon$unix_socket, u$path)
  log_event(mon, "info", "by MONITORING_SIDECAR")
  expect_true(close(mon, 5))
  got <- unix_collect(u, mon, 2)
  expect_equal(lapply(got, messages_of), list("by argument", "by MONITORING_SIDECAR"))
})

test_that("no socket file yet: calls return at once, and the backlog arrives once it listens", {
  on.exit(clean_env())
  clean_env()
  dir <- tempfile("unix-later-")
  dir.create(dir)
  problems <- character()
  mon <- monitoring_client("later", unix_socket = file.path(dir, "s.sock"), on_error = function(msg) problems <<- c(problems, msg))
  for (i in 1:5) log_event(mon, "info", "warm-up")
  took <- numeric(200)
  for (i in seq_along(took)) {
    t0 <- Sys.time()
    log_event(mon, "info", sprintf("m%d", i))
    took[i] <- as.double(Sys.time() - t0, units = "secs")
  }
  expect_lt(median(took), 0.005)
  expect_lt(max(took), 0.25)
  expect_match(problems[[1]], "cannot connect to unix:.*s[.]sock: No such file or directory")
  u <- unix_capture_server(dir)
  on.exit(stop_unix_server(u), add = TRUE)
  got <- unix_collect(u, mon, 205)
  expect_equal(messages_of(unlist(got)), c(rep("warm-up", 5), sprintf("m%d", 1:200)))
  close(mon)
})

test_that("the token goes first on every connection, and MONITORING_SIDECAR_TOKEN wins", {
  on.exit(clean_env())
  clean_env()
  u <- unix_capture_server()
  Sys.setenv(MONITORING_SIDECAR_TOKEN = 'from "the" environment')
  mon <- monitoring_client("token", unix_socket = u$path, token = "from the argument", on_error = function(msg) NULL)
  log_event(mon, "info", "one")
  unix_collect(u, mon, 2)
  stop_unix_server(u)  # the sidecar restarts: the next connection authenticates again
  log_event(mon, "info", "two")
  u <- unix_capture_server(u$dir)
  on.exit(stop_unix_server(u), add = TRUE)
  got <- unix_collect(u, mon, 4)
  close(mon)
  expect_equal(length(got), 2)
  for (lines in got) {
    expect_identical(jsonlite::fromJSON(lines[[1]], simplifyVector = FALSE), list(auth = 'from "the" environment'))
    expect_equal(length(grep('"auth"', lines, fixed = TRUE)), 1)  # only at the start
  }
  expect_equal(messages_of(c(got[[1]][-1], got[[2]][-1])), c("one", "two"))

  Sys.unsetenv("MONITORING_SIDECAR_TOKEN")  # over TCP, from the argument
  s <- capture_server()
  on.exit(stop_server(s), add = TRUE)
  mon <- new_client(s$port, token = "tcp too")
  log_event(mon, "info", "three")
  got <- collect(s, mon, 2)
  expect_identical(got[[1]], list(auth = "tcp too"))
  expect_equal(got[[2]]$data$message, "three")
  close(mon)
})
