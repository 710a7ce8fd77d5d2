# Conformance driver (sdk_clients/conformance/DRIVERS.md): replays a scenario's calls with the
# R SDK's public API against the sidecar named by MONITORING_SIDECAR, then closes the client.
#
#   Rscript sdk_clients/r/conformance-driver.R SCENARIO.json
#
# The package is built from the sources next to this script (dev-load.R: R CMD INSTALL into
# sdk_clients/r/build/, once per version of the sources) and loaded from there; it needs
# r-base-dev and r-cran-jsonlite.

main <- function(path) {
  here <- dirname(normalizePath(sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE)[[1]])))
  source(file.path(here, "dev-load.R"), local = TRUE)
  sdk <- asNamespace(loadNamespace("monitoringsdk", lib.loc = monitoringsdk_dev_lib(here)))

  scenario <- jsonlite::fromJSON(path, simplifyVector = FALSE)
  mon <- sdk$monitoring_client(scenario$source)
  saved <- list()
  arg <- function(a) {
    if (is.list(a) && !is.null(a$ref)) return(saved[[a$ref]])
    if (is.list(a) && !length(a)) return(NULL)  # {} as an empty map
    if (is.list(a)) return(lapply(a, function(v) if (is.null(v)) NA else v))  # string -> string maps
    a
  }
  calls <- list(
    set_context = function(key, value) sdk$set_context(mon, key, value),
    log_event = function(level, message, context = NULL) sdk$log_event(mon, level, message, context),
    log_metric = function(name, value, unit = NULL, tags = NULL) sdk$log_metric(mon, name, value, unit, tags),
    log_progress = function(job_id, percent, status = "running") sdk$log_progress(mon, job_id, percent, status),
    log_resource = function(cpu = NULL, memory = NULL, disk = NULL, network = NULL)
      sdk$log_resource(mon, cpu, memory, disk, network),
    start_span = function(name) sdk$start_span(mon, name),
    end_span = function(span_id, status = "success") sdk$end_span(mon, span_id, status),
    print_env = function(name) { cat(Sys.getenv(name), "\n", sep = ""); NULL }
  )
  for (call in scenario$calls) {
    fn <- calls[[call$call]]
    if (is.null(fn)) stop(sprintf("unknown call '%s'", call$call), call. = FALSE)
    args <- lapply(call$args, arg)
    # a JSON null is "argument not given": NULL, which every optional argument defaults to
    # or treats as absent, except the statuses, whose defaults apply when left out
    if (call$call %in% c("log_progress", "end_span") && length(args) >= 3L - (call$call == "end_span") &&
        is.null(args[[length(args)]])) args <- args[-length(args)]
    result <- do.call(fn, args)
    if (!is.null(call$save)) saved[[call$save]] <- result
    if (isTRUE(call$print)) cat(if (is.null(result)) "" else format(result), "\n", sep = "")
  }
  sdk$close.monitoring_client(mon)  # the suite reports anything that did not arrive
  invisible(NULL)
}

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 1L) {
  cat("usage: Rscript sdk_clients/r/conformance-driver.R SCENARIO.json\n", file = stderr())
  quit(status = 2)
}
status <- tryCatch({ main(args[[1]]); 0L }, error = function(e) {
  cat("conformance-driver.R: ", conditionMessage(e), "\n", file = stderr(), sep = "")
  1L
})
quit(status = status)
