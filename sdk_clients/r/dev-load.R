# The package as built from this source tree, for the tests, the benchmark and the conformance
# driver: `R CMD INSTALL` into sdk_clients/r/build/lib-<digest of the sources>/ (gitignored),
# once per version of the sources (2-5 s: the C code is compiled and the R code byte-compiled),
# then loaded from there. Needs what any R package with compiled code needs: Debian's
# r-base-dev (a C compiler and make; R's headers come with r-base-core).
#
#   source("sdk_clients/r/dev-load.R"); lib <- monitoringsdk_dev_lib("sdk_clients/r")
#   library(monitoringsdk, lib.loc = lib)
#
# The build happens in a copy of the sources and a private library that is renamed into place
# when complete, so runs at the same time neither see a half-installed package nor leave
# objects in src/. Nothing is printed on stdout; a failed build stops with R CMD INSTALL's output.

monitoringsdk_dev_lib <- function(root) {
  root <- normalizePath(root, mustWork = TRUE)
  sources <- c(file.path(root, c("DESCRIPTION", "NAMESPACE")),
               sort(list.files(file.path(root, "R"), pattern = "[.]R$", full.names = TRUE)),
               sort(list.files(file.path(root, "src"), pattern = "[.](c|h)$|^Makevars$", full.names = TRUE)))
  sums <- tools::md5sum(sources)
  key <- paste(basename(sources), unname(sums), collapse = "\n")
  keyfile <- tempfile()
  writeLines(key, keyfile)
  digest <- substr(unname(tools::md5sum(keyfile)), 1L, 12L)
  unlink(keyfile)
  build <- file.path(root, "build")
  lib <- file.path(build, paste0("lib-", digest))
  if (file.exists(file.path(lib, "monitoringsdk", "libs")) && file.exists(file.path(lib, ".complete"))) return(lib)

  dir.create(build, showWarnings = FALSE, recursive = TRUE)
  work <- tempfile("work-", tmpdir = build)
  dir.create(file.path(work, "pkg"), recursive = TRUE)
  dir.create(file.path(work, "lib"))
  on.exit(unlink(work, recursive = TRUE), add = TRUE)
  for (part in c("DESCRIPTION", "NAMESPACE", "R", "src", "man"))
    if (file.exists(file.path(root, part))) file.copy(file.path(root, part), file.path(work, "pkg"), recursive = TRUE)
  unlink(list.files(file.path(work, "pkg", "src"), pattern = "[.](o|so)$", full.names = TRUE))
  log <- file.path(work, "install.log")
  status <- system2(file.path(R.home("bin"), "R"),
                    c("CMD", "INSTALL", "--no-docs", paste0("--library=", shQuote(file.path(work, "lib"))),
                      shQuote(file.path(work, "pkg"))),
                    stdout = log, stderr = log)
  if (!identical(as.integer(status), 0L)) {
    stop(sprintf("building the monitoringsdk package failed (is r-base-dev installed?):\n%s",
                 paste(readLines(log, warn = FALSE), collapse = "\n")), call. = FALSE)
  }
  file.create(file.path(work, "lib", ".complete"))
  if (!suppressWarnings(file.rename(file.path(work, "lib"), lib)) && !file.exists(file.path(lib, ".complete"))) {
    stop(sprintf("cannot move the built package to %s", lib), call. = FALSE)
  }
  # builds of older sources, unused for an hour
  for (old in setdiff(list.files(build, pattern = "^lib-", full.names = TRUE), lib)) {
    if (difftime(Sys.time(), file.mtime(old), units = "hours") > 1) unlink(old, recursive = TRUE)
  }
  lib
}
