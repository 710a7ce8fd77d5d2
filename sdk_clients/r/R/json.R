# JSON encoding for wire protocol v1.
#
# jsonlite::toJSON() costs about 0.5 ms per message here (S4 dispatch for every value), more
# than the SDK's whole per-call budget. So values are encoded with jsonlite's own C string
# escaper, the one toJSON() uses, found once and checked against toJSON() before it is trusted
# (otherwise toJSON() is used per string); numbers are formatted so that they read back
# exactly. Every string that reaches the wire, keys included, goes through the escaper.

.json <- new.env(parent = emptyenv())

.json_escaper <- function() {
  if (!is.null(.json$escape)) return(.json$escape)
  slow <- function(x) vapply(x, function(s) as.character(jsonlite::toJSON(s, auto_unbox = TRUE)),
                             "", USE.NAMES = FALSE)
  fast <- tryCatch({
    sym <- get("C_escape_chars", envir = asNamespace("jsonlite"), inherits = FALSE)
    function(x) .Call(sym, x)
  }, error = function(e) NULL)
  probe <- enc2utf8(c("plain", "q\"b\\s/", "ctl\001\037\n\r\t\b\f", "\u00e9\u2028\U0001F600"))
  ok <- !is.null(fast) && tryCatch(identical(fast(probe), slow(probe)), error = function(e) FALSE)
  .json$escape <- if (ok) fast else slow
  .json$escape
}

# Strings as UTF-8 whatever the locale: text that already is valid UTF-8 is taken as such
# (Rscript in a C locale still gets UTF-8 from files), latin1 text is converted, and other bytes
# become U+FFFD rather than reaching the wire as invalid UTF-8.
.utf8 <- function(x) {
  x <- as.character(x)
  ok <- validUTF8(x)
  if (all(ok)) {
    Encoding(x) <- "UTF-8"  # a no-op for ASCII and for text marked UTF-8 already
    return(x)
  }
  bad <- which(!ok)
  latin1 <- Encoding(x[bad]) == "latin1" | (!l10n_info()[["UTF-8"]] && l10n_info()[["Latin-1"]])
  fixed <- x[bad]
  fixed[latin1] <- enc2utf8(fixed[latin1])
  fixed[!latin1] <- iconv(`Encoding<-`(fixed[!latin1], "bytes"), "UTF-8", "UTF-8",
                          sub = rawToChar(as.raw(c(0xef, 0xbf, 0xbd))))
  x[bad] <- fixed
  Encoding(x) <- "UTF-8"
  x
}

# Encoded JSON strings; NA becomes null.
.json_str <- function(x) {
  x <- .utf8(x)
  out <- .json_escaper()(x)
  out[is.na(x)] <- "null"
  out
}

# Numbers that read back exactly: 15 significant digits when enough, else 17; non-finite -> null.
.json_num <- function(x) {
  x <- as.double(x)
  out <- sprintf("%.15g", x)
  fin <- is.finite(x)
  redo <- fin & as.double(out) != x
  if (any(redo)) out[redo] <- sprintf("%.17g", x[redo])
  out[!fin] <- "null"
  out
}

# An object from names and already encoded values.
.json_object <- function(keys, values) {
  if (!length(keys)) return("{}")
  paste0("{", paste0(.json_str(keys), ":", values, collapse = ","), "}")
}

# Any R value a user may pass as context: named lists and named vectors become objects,
# length-1 unnamed vectors scalars, other vectors arrays; factors and dates their text.
.json_value <- function(x) {
  if (is.null(x)) return("null")
  if (is.list(x)) {
    vals <- vapply(x, .json_value, "", USE.NAMES = FALSE)
    if (!is.null(names(x))) return(.json_object(names(x), vals))
    return(paste0("[", paste(vals, collapse = ","), "]"))
  }
  named <- !is.null(names(x))
  vals <- if (is.logical(x)) ifelse(is.na(x), "null", ifelse(x, "true", "false"))
          else if (is.numeric(x) && !is.object(x)) .json_num(x)
          else .json_str(as.character(x))
  if (named) return(.json_object(names(x), vals))
  if (length(x) == 1L) return(vals)
  paste0("[", paste(vals, collapse = ","), "]")
}
