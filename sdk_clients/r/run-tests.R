# Runs the R SDK's tests: Rscript sdk_clients/r/run-tests.R
# Builds the package from the source tree first (dev-load.R: R CMD INSTALL into
# sdk_clients/r/build/, skipped when the sources did not change), then runs testthat on it.
# Needs r-base-dev, r-cran-testthat and r-cran-jsonlite. Ends with "N passed, N failed"; exit 1 on failure.
here <- dirname(normalizePath(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)[[1]])))
source(file.path(here, "dev-load.R"))
lib <- tryCatch(monitoringsdk_dev_lib(here), error = function(e) {
  cat(conditionMessage(e), "\n0 passed, 1 failed\n", sep = "")
  quit(status = 1)
})
.libPaths(c(lib, .libPaths()))
results <- as.data.frame(testthat::test_dir(file.path(here, "tests", "testthat"), package = "monitoringsdk",
                                            load_package = "installed", reporter = "summary",
                                            stop_on_failure = FALSE))
failed <- sum(results$failed) + sum(results$error)
cat(sprintf("%d passed, %d failed\n", sum(results$nb) - sum(results$failed) - sum(results$skipped), failed))
quit(status = if (failed) 1L else 0L)
