//! Helpers shared by the controller's integration tests.
#![allow(dead_code)] // each test file uses its own subset

pub mod agent;
pub mod kube_mock;
pub mod kube_real;
pub mod shared_api;
