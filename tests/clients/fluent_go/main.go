// A Fluent forward client nobody here wrote: fluent-logger-golang, the library inside Docker's
// fluentd log driver. It sends COUNT records shaped as the driver's (container_id,
// container_name, source, log) under the tag TAG, with acks, sub-second times or async sending
// as MODE says, and exits non-zero if the library reports an error.
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/fluent/fluent-logger-golang/fluent"
)

func main() {
	port, _ := strconv.Atoi(os.Getenv("FLUENT_PORT"))
	count, _ := strconv.Atoi(os.Getenv("COUNT"))
	mode := os.Getenv("MODE")
	config := fluent.Config{
		FluentHost:         "127.0.0.1",
		FluentPort:         port,
		RequestAck:         mode == "ack",
		SubSecondPrecision: mode == "ack" || mode == "subsecond",
		Async:              mode == "async",
		Timeout:            10 * time.Second,
		WriteTimeout:       10 * time.Second,
		MaxRetry:           3,
	}
	logger, err := fluent.New(config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "connect:", err)
		os.Exit(1)
	}
	for i := 0; i < count; i++ {
		record := map[string]string{
			"container_id":   "3f2a9c1b7d4e",
			"container_name": "/web",
			"source":         "stdout",
			"log":            fmt.Sprintf("line %d", i),
		}
		if err := logger.PostWithTime(os.Getenv("TAG"), time.Now(), record); err != nil {
			fmt.Fprintln(os.Stderr, "post:", err)
			os.Exit(1)
		}
	}
	if err := logger.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "close:", err)
		os.Exit(1)
	}
}
