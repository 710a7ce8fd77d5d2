# JSON encoding for wire protocol v1, for what R encodes itself: the data of the less frequent
# calls (progress, resource, spans), arguments that the C fast path leaves to R, and contexts.
#
# jsonlite::toJSON() costs about 0.5 ms per message (S4 dispatch for every value), more than
# the SDK's whole per-call budget. Strings go through the package's C escaper (the one the
# fast path uses): the same escaping as jsonlite's, text sent as UTF-8 whatever the locale
# (latin1 converted, bytes that are not valid UTF-8 become U+FFFD). Numbers are formatted so
# that they read back exactly. Every string that reaches the wire, keys included, is escaped.

# Encoded JSON strings; NA becomes null.
.json_str <- function(x) .Call(C_escape, as.character(x))

# Numbers that read back exactly: 15 significant digits when enough, else 17; non-finite -> null.
.json_num <- function(x) .Call(C_numbers, as.double(x))

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
