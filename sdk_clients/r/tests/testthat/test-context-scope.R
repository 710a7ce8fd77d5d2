# Context set inside a root span belongs to it: undone (and MONITORING_CONTEXT with it) when the
# root span ends, after its end message. Context set with no span open lasts.

ctx_env <- function() {
  v <- Sys.getenv("MONITORING_CONTEXT", NA)
  if (is.na(v)) NA else jsonlite::fromJSON(v, simplifyVector = FALSE)
}

test_that("the queue-service loop: no message of job 2 carries job 1's job_id", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  set_context(mon, "service", "qs")
  for (job in c("job-1", "job-2")) {
    id <- start_span(mon, "process_job")
    set_context(mon, "job_id", job)
    log_progress(mon, job, 100, "completed")
    end_span(mon, id, "success")
    log_metric(mon, "jobs_processed", 1, "count")
    expect_equal(ctx_env(), list(service = "qs"))
  }
  got <- collect(s, mon, 8)
  expect_length(got, 8)
  ctx <- lapply(got, function(m) m$context)
  expect_equal(ctx[[1]], list(service = "qs"))                     # start of job 1
  expect_equal(ctx[[2]], list(service = "qs", job_id = "job-1"))   # progress
  expect_equal(ctx[[3]], list(service = "qs", job_id = "job-1"))   # end: the context as it is
  expect_equal(ctx[[4]], list(service = "qs"))                     # jobs_processed, after the span
  job2 <- got[5:8]
  expect_equal(job2[[1]]$data, list(name = "process_job", phase = "start"))
  expect_equal(job2[[1]]$context, list(service = "qs"))
  for (m in job2) expect_false(identical(m$context$job_id, "job-1"))
  expect_equal(job2[[2]]$context$job_id, "job-2")
  expect_false(identical(job2[[1]]$trace_id, got[[1]]$trace_id))  # a new trace per job
  expect_null(got[[8]]$trace_id)
  close(mon)
})

test_that("changed and removed keys come back; an empty context unsets MONITORING_CONTEXT", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  set_context(mon, "service", "qs")
  set_context(mon, "region", "eu")
  id <- start_span(mon, "job")
  set_context(mon, "service", "other")
  set_context(mon, "region", NULL)
  set_context(mon, "file", "a.csv")
  expect_equal(ctx_env(), list(service = "other", file = "a.csv"))
  end_span(mon, id)
  expect_equal(ctx_env(), list(service = "qs", region = "eu"))
  log_event(mon, "info", "after")
  set_context(mon, "service", NULL)
  set_context(mon, "region", NULL)
  id <- start_span(mon, "empty")
  set_context(mon, "job_id", "job-3")
  end_span(mon, id)
  expect_true(is.na(Sys.getenv("MONITORING_CONTEXT", NA)))
  log_event(mon, "info", "nothing")
  got <- collect(s, mon, 6)
  expect_equal(got[[2]]$context, list(service = "other", file = "a.csv"))
  expect_equal(got[[3]]$context, list(service = "qs", region = "eu"))
  expect_equal(got[[5]]$context, list(job_id = "job-3"))
  expect_null(got[[6]]$context)
  close(mon)
})

test_that("a nested span does not scope context; its root span does", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  root <- start_span(mon, "process_job")
  set_context(mon, "job_id", "job-1")
  inner <- start_span(mon, "load")
  set_context(mon, "stage", "load")
  end_span(mon, inner)
  expect_equal(ctx_env(), list(job_id = "job-1", stage = "load"))
  log_event(mon, "info", "after the nested span")
  end_span(mon, root)
  expect_true(is.na(Sys.getenv("MONITORING_CONTEXT", NA)))
  log_event(mon, "info", "outside")
  got <- collect(s, mon, 6)
  expect_length(got, 6)
  expect_equal(got[[3]][c("span_id", "context")], list(span_id = inner, context = list(job_id = "job-1", stage = "load")))
  expect_equal(got[[4]]$context, list(job_id = "job-1", stage = "load"))
  expect_equal(got[[5]][c("span_id", "context")], list(span_id = root, context = list(job_id = "job-1", stage = "load")))
  expect_null(got[[6]]$context)
  close(mon)
})

test_that("spans ended out of order: the restore happens when the root span ends", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  set_context(mon, "service", "qs")
  root <- start_span(mon, "process_job")
  inner <- start_span(mon, "load")
  set_context(mon, "job_id", "job-1")
  end_span(mon, root)                                   # the nested span is still open
  expect_equal(ctx_env(), list(service = "qs"))
  log_event(mon, "info", "inner still open")
  set_context(mon, "stage", "late")                     # inside a span that is not a root
  end_span(mon, inner)
  expect_equal(ctx_env(), list(service = "qs", stage = "late"))
  got <- collect(s, mon, 6)
  expect_equal(got[[3]][c("span_id", "context")], list(span_id = root, context = list(service = "qs", job_id = "job-1")))
  expect_equal(got[[4]]$span_id, inner)
  expect_equal(got[[4]]$context, list(service = "qs"))
  expect_equal(got[[5]]$data$phase, "end")
  expect_equal(got[[5]]$context, list(service = "qs", stage = "late"))
  close(mon)
})

test_that("the inherited MONITORING_CONTEXT comes back after a root span", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port, env = list(
    TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    MONITORING_CONTEXT = '{"job_id":"job-parent","n":3}'))
  id <- start_span(mon, "load_data")
  set_context(mon, "job_id", "job-child")
  set_context(mon, "file", "a.csv")
  end_span(mon, id)
  expect_equal(ctx_env(), list(job_id = "job-parent", n = 3L))
  expect_equal(Sys.getenv("TRACEPARENT"), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
  log_event(mon, "info", "back")
  got <- collect(s, mon, 3)
  expect_equal(got[[2]]$context, list(job_id = "job-child", n = 3L, file = "a.csv"))
  expect_equal(got[[3]]$context, list(job_id = "job-parent", n = 3L))
  expect_equal(got[[3]]$span_id, "00f067aa0ba902b7")
  close(mon)
})

test_that("with_span scopes context the same way, also when its code fails", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  set_context(mon, "service", "qs")
  with_span(mon, "job", set_context(mon, "job_id", "job-1"))
  expect_equal(ctx_env(), list(service = "qs"))
  expect_error(with_span(mon, "bad", { set_context(mon, "job_id", "job-2"); stop("boom") }), "boom")
  expect_equal(ctx_env(), list(service = "qs"))
  log_event(mon, "info", "after")
  got <- collect(s, mon, 5)
  expect_equal(got[[2]]$context, list(service = "qs", job_id = "job-1"))
  expect_equal(got[[4]]$context, list(service = "qs", job_id = "job-2"))
  expect_equal(got[[4]]$data$status, "error")
  expect_equal(got[[5]]$context, list(service = "qs"))
  close(mon)
})

test_that("an unknown span id restores nothing and raises nothing", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  id <- start_span(mon, "job")
  set_context(mon, "job_id", "job-1")
  expect_silent(end_span(mon, "0123456789abcdef"))
  expect_equal(ctx_env(), list(job_id = "job-1"))
  end_span(mon, id)
  expect_silent(end_span(mon, id))                      # already ended
  expect_true(is.na(Sys.getenv("MONITORING_CONTEXT", NA)))
  close(mon)
})
