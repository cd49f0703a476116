//! swarmnet's service discovery. For now the record store only: names from the endpoint
//! table, answered per asker (a task sees only names on the networks it is attached to).
//! The hickory-server listener in each task, forwarding and TTLs are issue 4's next parts.

pub mod records;
