HEX32 <- "^[0-9a-f]{32}$"
HEX16 <- "^[0-9a-f]{16}$"

test_that("spans nest: ids, parent links, duration and the messages inside", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  outer <- start_span(mon, "load")
  inner <- start_span(mon, "parse")
  log_event(mon, "info", "inside")
  end_span(mon, inner)
  end_span(mon, outer, "error")
  log_event(mon, "info", "outside")
  got <- collect(s, mon, 6)
  expect_match(outer, HEX16)
  expect_match(got[[1]]$trace_id, HEX32)
  trace <- got[[1]]$trace_id
  expect_equal(vapply(got[1:5], function(m) m$trace_id, ""), rep(trace, 5))
  expect_equal(got[[1]]$span_id, outer)
  expect_null(got[[1]]$parent_span_id)
  expect_equal(got[[1]]$data, list(name = "load", phase = "start"))
  expect_equal(got[[2]][c("span_id", "parent_span_id")], list(span_id = inner, parent_span_id = outer))
  expect_equal(got[[3]]$span_id, inner)
  expect_null(got[[3]]$parent_span_id)
  expect_equal(got[[4]]$data$status, "success")
  expect_equal(got[[4]]$parent_span_id, outer)
  expect_true(is.numeric(got[[4]]$data$duration_ms) && got[[4]]$data$duration_ms >= 0)
  expect_equal(got[[5]]$data[c("name", "phase", "status")], list(name = "load", phase = "end", status = "error"))
  expect_null(got[[6]]$trace_id)
  close(mon)
})

test_that("with_span ends with success, or with error and re-raises", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  expect_equal(with_span(mon, "ok", { log_metric(mon, "n", 1); 42 }), 42)
  expect_error(with_span(mon, "bad", stop("boom")), "boom")
  got <- collect(s, mon, 5)
  expect_equal(got[[2]]$span_id, got[[1]]$span_id)
  expect_equal(got[[3]]$data$status, "success")
  expect_equal(got[[5]]$data[c("name", "status")], list(name = "bad", status = "error"))
  close(mon)
})

test_that("TRACEPARENT and MONITORING_CONTEXT are picked up at creation", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port, env = list(
    TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    MONITORING_CONTEXT = '{"job_id":"job-12345","n":3,"ok":true,"nested":{"a":[1,"b"]}}'))
  log_event(mon, "info", "child")
  id <- start_span(mon, "step")
  end_span(mon, id)
  got <- collect(s, mon, 3)
  expect_equal(got[[1]][c("trace_id", "span_id")],
               list(trace_id = "4bf92f3577b34da6a3ce929d0e0e4736", span_id = "00f067aa0ba902b7"))
  expect_equal(got[[1]]$context, list(job_id = "job-12345", n = 3L, ok = TRUE, nested = list(a = list(1L, "b"))))
  expect_equal(got[[2]]$parent_span_id, "00f067aa0ba902b7")
  expect_equal(got[[2]]$trace_id, "4bf92f3577b34da6a3ce929d0e0e4736")
  close(mon)
})

test_that("an invalid TRACEPARENT is ignored", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port, env = list(TRACEPARENT = "00-00000000000000000000000000000000-00f067aa0ba902b7-01"))
  log_event(mon, "info", "x")
  got <- collect(s, mon, 1)
  expect_null(got[[1]]$trace_id)
  close(mon)
})

test_that("TRACEPARENT and MONITORING_CONTEXT are exported for child processes", {
  s <- capture_server()
  on.exit({ stop_server(s); clean_env() })
  mon <- new_client(s$port)
  set_context(mon, "job_id", "job-7")
  expect_equal(jsonlite::fromJSON(Sys.getenv("MONITORING_CONTEXT")), list(job_id = "job-7"))
  id <- with_span(mon, "run-child", {
    child <- system2(file.path(R.home("bin"), "Rscript"),
                     c("-e", shQuote("cat(Sys.getenv('TRACEPARENT'), Sys.getenv('MONITORING_CONTEXT'), sep = '\\n')")),
                     stdout = TRUE)
    expect_match(child[[1]], "^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
    expect_equal(child[[2]], Sys.getenv("MONITORING_CONTEXT"))
    child[[1]]
  })
  expect_equal(Sys.getenv("TRACEPARENT"), "")
  got <- collect(s, mon, 2)
  expect_equal(id, sprintf("00-%s-%s-01", got[[1]]$trace_id, got[[1]]$span_id))
  set_context(mon, "job_id", NULL)
  expect_equal(Sys.getenv("MONITORING_CONTEXT", NA), NA_character_)
  close(mon)
})
