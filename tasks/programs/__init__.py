"""Programs uploaded to hosts as they are and run there with the standard library alone (no
project imports): the primary detector on the routers, etcd leader placement on database hosts.
Tests import them from here; the roll-out copies the file."""
