//! Home of the ingress routing mesh (issue 10, not built yet): a sink of the endpoint stream
//! that makes every published port answer on every node and spread connections over the
//! service's tasks on all nodes, over the ingress network. Nothing here yet: a published
//! port is accepted by the manager but nothing listens on it.
