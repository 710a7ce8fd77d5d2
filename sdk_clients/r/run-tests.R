# Runs the R SDK's tests from the source tree (no install): Rscript sdk_clients/r/run-tests.R
# Needs r-cran-testthat and r-cran-jsonlite. Ends with "N passed, N failed"; exit 1 on failure.
here <- dirname(normalizePath(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)[[1]])))
results <- as.data.frame(testthat::test_local(here, reporter = "summary", stop_on_failure = FALSE))
failed <- sum(results$failed) + sum(results$error)
cat(sprintf("%d passed, %d failed\n", sum(results$nb) - sum(results$failed) - sum(results$skipped), failed))
quit(status = if (failed) 1L else 0L)
