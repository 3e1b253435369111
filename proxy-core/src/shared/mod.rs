//! State that several replicas share: the Redis connection behind the shared rate
//! limits (`policy::ratelimit`) and the shared response cache (`pipeline::cache`).

pub mod redis;
