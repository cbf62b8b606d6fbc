// CoreDNS with only the plugins the real node's Corefile uses (k8s-tests/node.py): the
// upstream main package links all ~60 plugins and their cloud SDKs, which took about 52
// minutes to build cold on two cores. The plugins register themselves in init(); CoreDNS's
// directive order (dnsserver.Directives) is unchanged, and a directive whose plugin is not
// linked in is refused when a Corefile names it.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
