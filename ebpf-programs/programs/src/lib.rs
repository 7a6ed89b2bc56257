//! Host builds of this crate hold nothing: the programs are the `edgeplane` binary, built for
//! `bpfel-unknown-none`. The library target exists so the agent can declare a build dependency.
#![no_std]
