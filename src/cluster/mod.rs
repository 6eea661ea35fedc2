//! The mini-cluster behind `podvisor up`: a Kubernetes-compatible API server
//! over a durable object store, plus the scheduler, controllers and node agent
//! that drive pods through CRI.

pub mod agent;
pub mod apiserver;
pub mod client;
pub mod controllers;
pub mod cron;
pub mod disruption;
pub mod dns;
pub mod events;
pub mod forward;
pub mod informer;
pub mod nodenet;
pub mod nodes;
pub mod proxy;
pub mod scheduler;
pub mod store;
pub mod up;
