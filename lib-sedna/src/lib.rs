//! `sedna`: the library edge-cloud AI apps program against, in Rust and (through
//! `lib-sedna/python`) in Python. Its concepts are those of Sedna's Python library, so Sedna
//! users feel at home.
//!
//! - [`hem`]: hard-example mining (Threshold, CrossEntropy, IBT, Random, CloudOnly, EdgeOnly,
//!   and your own), configured as Sedna configures it.
//! - [`weights`]: model weights as named tensors, encoded in binary (fp32, fp16, int8).
//! - [`aggregate`]: federated aggregation (FedAvg, FedAvgM, FedAdam, FedYogi, FedMedian,
//!   FedTrimmedAvg, Krum).
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod config;
pub mod dataset;
pub mod fl;
pub mod hem;
pub mod inference;
pub mod joint;
pub mod storage;
pub mod weights;
