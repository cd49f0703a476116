//! Home of the service-VIP load balancer (issue 9, not built yet): a sink of the endpoint
//! stream that turns `VIP:port` of a service into its active tasks, with an eBPF backend
//! (cgroup sock_addr programs from `ebpf/`, loaded and written here) and an nftables
//! fallback behind one trait. Nothing here yet: a VIP resolves in DNS but nothing answers.
