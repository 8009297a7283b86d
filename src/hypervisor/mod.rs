//! Driving QEMU: the accelerator probe, the command line, the QMP client,
//! disk images, and the per-VM supervisor.

pub mod accel;
pub mod img;
pub mod logcap;
pub mod qemu;
pub mod qmp;
pub mod supervisor;
pub mod usb;
pub mod virtiofs;
pub mod vnc;
