// Linkerd's proxy-init as its module on the Go module proxy ships it (the
// command of github.com/linkerd/linkerd2-proxy-init's root main.go), built for
// halfclose's generator tests.  Only a main: the rule code is Linkerd's own,
// imported by version in go.mod.
package main

import (
	"os"

	log "github.com/sirupsen/logrus"

	"github.com/linkerd/linkerd2-proxy-init/cmd"
)

func main() {
	log.SetOutput(os.Stdout)
	if err := cmd.NewRootCmd().Execute(); err != nil {
		os.Exit(1)
	}
}
