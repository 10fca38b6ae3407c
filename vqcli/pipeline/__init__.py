"""The batch pipeline: from input paths to one result per file. Prints nothing.

``encode_files`` and ``decode_files`` are generators of ``FileResult``. Each is a chain of small
stages, each one function, so that each can be replaced on its own (tiling for large images in
``compute``, a share of the inputs per process in front of ``find_jobs``):

    find_jobs          walk the inputs (streaming), name each output, refuse collisions; tar
                       shards become a ``TarJob`` each (``find_units``); or, from a manifest,
                       the lines not finished (``jobs_from_entries``)
    select_jobs        number the blocks batches never cross (``number_blocks``); with a share
                       (torchrun rank, ``--shard I/N``), list everything, split the blocks by size
                       (``vqcli.shards``) and keep this process's
    expand_tars        read each tar shard front to back: a ``MemberJob`` per image inside
    check_existing     skip finished outputs (resume); never touch files vqcli did not write
    prepare_image      load, pad and record the original size  |  prepare_latent: read, validate,
                                                                   choose and check the model
                       (``io_threads``: in worker threads, ahead of the model, in order)
    batched            group items of equal shape, at most ``batch_size``, few held back
    compute            run the model on a batch under inference mode; a batch that fails is
                       retried one item at a time; non-finite outputs in reduced precision are
                       redone in float32 (reported in the result)
    write_latent / save_image   atomic writes (temporary name, then rename); with
                       ``--tar-output``, a tar shard's latents go into one tar written atomically;
                       (``io_threads``: on one thread behind the model, in order; on Ctrl-C the
                       writes under way finish and are reported, see ``cli.common.last_results``)

A failure in one file (``FileError``) becomes that file's result and the others go on. Memory
stays flat over any number of files: files are found while they are processed (a share needs
the whole list first: it keeps one number per block), and at most a few batches of images are
held at once. Each result carries its job (``FileResult.job``), from which ``entry_of`` makes the
manifest line.

Output names: each input's path relative to the folder it was found in (a file named directly:
its name) is mirrored under the output folder. Encoding appends ``.safetensors`` to the whole
image name (``a.png`` -> ``a.png.safetensors``, so ``a.png`` and ``a.jpg`` never collide).
Decoding strips ``.safetensors``; the remaining name is kept when its extension already is the
output format's (``a.png.safetensors`` -> ``a.png``) and gets the format's extension appended
otherwise (``a.jpg.safetensors`` -> ``a.jpg.png``). Output paths come only from input paths, never
from anything inside a file. Two inputs that would write the same output (the same relative path
under two input folders) are refused, the second one failing with a message.
"""
