library(testthat)
library(monitoringsdk)

test_check("monitoringsdk")
