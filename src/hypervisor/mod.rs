//! Driving QEMU: the accelerator probe, the command line, the QMP client,
//! disk images, the per-VM supervisor and the processes lume owns around
//! it (the detached supervisor, forcing QEMU off).

pub mod accel;
pub mod img;
pub mod logcap;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod supervisor;
pub mod usb;
pub mod virtiofs;
pub mod vnc;
