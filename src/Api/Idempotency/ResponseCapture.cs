using System.Buffers;
using System.IO.Pipelines;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.Extensions.Primitives;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The response body an idempotent action writes to, as a stream and as a pipe: every byte goes to the client as
/// usual and is also copied, into a pooled buffer, until the copy would pass <see cref="Limit"/>; past that it stops
/// copying (the client still gets every byte) and only counts. A write to the client that fails once its token
/// (<paramref name="clientGone"/>) has fired means the client has gone: the action does not hear of it, and runs
/// on for the client's retry (<see cref="DetachedRequestLifetime"/>) with its bytes only copied from then on. The
/// token alone stops nothing: a request time-out outside this layer fires it with the client still there, and that
/// client gets every byte.
/// </summary>
/// <remarks>
/// The layer owns the copy: an action that disposes the stream (a <see cref="StreamWriter"/> without
/// <c>leaveOpen</c>) changes nothing, and <see cref="ReturnBuffer"/> gives the buffer back once it is stored.
/// </remarks>
internal sealed class ResponseCapture(IHttpResponseBodyFeature client, int limit, HttpResponse response, CancellationToken clientGone)
    : Stream, IHttpResponseBodyFeature
{
    private readonly Stream inner = client.Stream;
    private byte[] buffer = [];
    private int copied;
    private ActionPipe? writer;
    private bool writerCompleted;
    private bool clientLost;
    private bool encodingRead;
    private bool arrivedEncoded;

    /// <summary>The most bytes kept.</summary>
    public int Limit { get; } = limit;

    /// <summary>Bytes written through so far.</summary>
    public long BytesWritten { get; private set; }

    /// <summary>True when the body was larger than <see cref="Limit"/>, so the copy is incomplete.</summary>
    public bool Overflowed { get; private set; }

    /// <summary>
    /// True when the action had set a <c>Content-Encoding</c> by the time it first passed anything on (a write, even an
    /// empty one, a flush, a start), or by now if it passed nothing on: the copy is encoded, and the header describes
    /// it. Set later, by a layer outside this one that encodes what passes through it (response compression, which
    /// decides at any write), the header describes only what that client got; such a layer encodes a replay afresh.
    /// </summary>
    public bool ArrivedEncoded => encodingRead ? arrivedEncoded : HasEncoding;

    private bool HasEncoding => !StringValues.IsNullOrEmpty(response.Headers.ContentEncoding);

    /// <summary>True once the action started its response, flushed it, or wrote a byte of it.</summary>
    public bool Started { get; private set; }

    /// <summary>The status the response had when it <see cref="Started"/>: once begun, its outcome is that one.</summary>
    public int StatusAtStart { get; private set; }

    public override bool CanRead => false;

    public override bool CanSeek => false;

    public override bool CanWrite => true;

    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => throw new NotSupportedException();
        set => throw new NotSupportedException();
    }

    Stream IHttpResponseBodyFeature.Stream => this;

    PipeWriter IHttpResponseBodyFeature.Writer => writer ??= new ActionPipe(this, PipeWriter.Create(this, new StreamPipeWriterOptions(leaveOpen: true)));

    /// <summary>The copied body; valid when not <see cref="Overflowed"/>.</summary>
    public byte[] ToArray() => Overflowed ? [] : buffer.AsSpan(0, copied).ToArray();

    /// <summary>Passes on what the action left in the body's pipe without flushing it, as a server would at its end.</summary>
    public async Task FlushWriterAsync()
    {
        if (writer is not null && !writerCompleted)
        {
            writerCompleted = true;
            await writer.CompleteAsAskedAsync();
        }
    }

    /// <summary>
    /// The exception the action completed its <c>BodyWriter</c> with, if it did: it failed, as if it had thrown it (a
    /// server answers 500, or aborts a response begun).
    /// </summary>
    public Exception? WriterFailure => writer?.Failure;

    /// <summary>
    /// Sends and ends the response whose <c>BodyWriter</c> the action completed, if it did: a server would have done so
    /// then, and the client gets it even when the action fails afterwards.
    /// </summary>
    public Task SendCompletedResponseAsync() =>
        writer is { CompletedByAction: true } ? ((IHttpResponseBodyFeature)this).CompleteAsync() : Task.CompletedTask;

    /// <summary>Gives the copy's buffer back to the pool; the copy is gone after this.</summary>
    public void ReturnBuffer()
    {
        if (buffer.Length > 0)
        {
            ArrayPool<byte>.Shared.Return(buffer);
            buffer = [];
            copied = 0;
        }
    }

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        PassPipe();
        var startedBefore = Starting(buffer.Length > 0);
        if (!clientLost)
        {
            try
            {
                inner.Write(buffer);
            }
            catch (Exception e) when (LostClient(e))
            {
            }
            catch
            {
                Refused(startedBefore);
                throw;
            }
        }

        Keep(buffer);
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (writer is { Holds: true })
        {
            return PassPipeThenWriteAsync(buffer, cancellationToken);
        }

        var startedBefore = Starting(buffer.Length > 0);
        if (!clientLost)
        {
            ValueTask write;
            try
            {
                write = inner.WriteAsync(buffer, cancellationToken);
            }
            catch (Exception e) when (LostClient(e))
            {
                write = ValueTask.CompletedTask;
            }
            catch
            {
                Refused(startedBefore);
                throw;
            }

            if (!write.IsCompletedSuccessfully)
            {
                return KeepOnceWrittenAsync(write, buffer, startedBefore);
            }
        }

        Keep(buffer.Span);
        return ValueTask.CompletedTask;
    }

    // Beside Stream's default, which would write synchronously on another thread, and a server may refuse that.
    public override IAsyncResult BeginWrite(byte[] buffer, int offset, int count, AsyncCallback? callback, object? state) =>
        TaskToAsyncResult.Begin(WriteAsync(buffer, offset, count, CancellationToken.None), callback, state);

    public override void EndWrite(IAsyncResult asyncResult) => TaskToAsyncResult.End(asyncResult);

    public override void Flush()
    {
        PassPipe();
        var startedBefore = Starting(true);
        if (clientLost)
        {
            return;
        }

        try
        {
            inner.Flush();
        }
        catch (Exception e) when (LostClient(e))
        {
        }
        catch
        {
            Refused(startedBefore);
            throw;
        }
    }

    public override Task FlushAsync(CancellationToken cancellationToken)
    {
        if (writer is { Holds: true })
        {
            return PassPipeThenFlushAsync(cancellationToken);
        }

        return ToClientAsync(static (inner, cancel) => inner.FlushAsync(cancel), inner, Starting(true), cancellationToken);
    }

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    void IHttpResponseBodyFeature.DisableBuffering() => client.DisableBuffering();

    Task IHttpResponseBodyFeature.StartAsync(CancellationToken cancellationToken)
    {
        return ToClientAsync(static (client, cancel) => client.StartAsync(cancel), client, Starting(true), cancellationToken);
    }

    Task IHttpResponseBodyFeature.SendFileAsync(string path, long offset, long? count, CancellationToken cancellationToken) =>
        SendFileFallback.SendFileAsync(this, path, offset, count, cancellationToken);

    async Task IHttpResponseBodyFeature.CompleteAsync()
    {
        var startedBefore = Starting(true);
        await FlushWriterAsync();
        await ToClientAsync(static (client, _) => client.CompleteAsync(), client, startedBefore, CancellationToken.None);
    }

    // The action's to call, not to act on: the layer still needs the copy (ReturnBuffer), and writes keep working.
    protected override void Dispose(bool disposing) => base.Dispose(disposing);

    private async ValueTask PassPipeThenWriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken)
    {
        await writer!.FlushAsync(cancellationToken);
        await WriteAsync(buffer, cancellationToken);
    }

    private async Task PassPipeThenFlushAsync(CancellationToken cancellationToken)
    {
        await writer!.FlushAsync(cancellationToken);
        await FlushAsync(cancellationToken);
    }

    // A synchronous write by the action: the pipe has no synchronous flush, and the action chose to block.
    private void PassPipe()
    {
        if (writer is { Holds: true })
        {
            writer.FlushAsync().AsTask().GetAwaiter().GetResult();
        }
    }

    // A client that has gone fails writes (or drops them unseen); its action must not fail for it. Only what a closed
    // connection throws (Kestrel's reset and abort exceptions are of these kinds): any other failure is the action's.
    private bool LostClient(Exception e)
    {
        if (!clientGone.IsCancellationRequested || e is not (IOException or OperationCanceledException))
        {
            return false;
        }

        clientLost = true;
        return true;
    }

    private async ValueTask KeepOnceWrittenAsync(ValueTask write, ReadOnlyMemory<byte> buffer, bool startedBefore)
    {
        try
        {
            await write;
        }
        catch (Exception e) when (LostClient(e))
        {
        }
        catch
        {
            Refused(startedBefore);
            throw;
        }

        Keep(buffer.Span);
    }

    private Task ToClientAsync<T>(Func<T, CancellationToken, Task> send, T target, bool startedBefore, CancellationToken cancellationToken)
    {
        if (clientLost)
        {
            return Task.CompletedTask;
        }

        try
        {
            var sending = send(target, cancellationToken);
            return sending.IsCompletedSuccessfully ? sending : AwaitAsync(sending);
        }
        catch (Exception e) when (LostClient(e))
        {
            return Task.CompletedTask;
        }
        catch
        {
            Refused(startedBefore);
            throw;
        }

        async Task AwaitAsync(Task pending)
        {
            try
            {
                await pending;
            }
            catch (Exception e) when (LostClient(e))
            {
            }
            catch
            {
                Refused(startedBefore);
                throw;
            }
        }
    }

    // Before anything is passed on: starting the response is where an outer encoder sets its header.
    private void NoteStart()
    {
        if (!Started)
        {
            Started = true;
            StatusAtStart = response.StatusCode;
            ReadEncoding();
        }
    }

    // Read once: after anything passed on (an empty write included, or a start the server refused), an outer encoder
    // may have set its header already.
    private void ReadEncoding()
    {
        if (!encodingRead)
        {
            encodingRead = true;
            arrivedEncoded = HasEncoding;
        }
    }

    // Before anything is passed on, since an outer encoder sets its header at the first write of any length or as the
    // response starts (NoteStart); true when the response had begun before.
    private bool Starting(bool starts)
    {
        ReadEncoding();
        var startedBefore = Started;
        if (starts)
        {
            NoteStart();
        }

        return startedBefore;
    }

    // The server refused what was passed on (a synchronous write or flush it does not allow, more than the
    // Content-Length, an OnStarting callback that threw): the response has not begun if that was to begin it and the
    // server sent nothing.
    private void Refused(bool startedBefore)
    {
        if (!startedBefore && !response.HasStarted)
        {
            Started = false;
        }
    }

    // Once the client has them, or has gone: the copy is of the bytes the client got.
    private void Keep(ReadOnlySpan<byte> data)
    {
        BytesWritten += data.Length;
        if (Overflowed)
        {
            return;
        }

        if (copied + data.Length > Limit)
        {
            Overflowed = true;
            return;
        }

        if (copied + data.Length > buffer.Length)
        {
            var larger = ArrayPool<byte>.Shared.Rent(Math.Min(Limit, Math.Max(copied + data.Length, Math.Max(buffer.Length * 2, 1024))));
            buffer.AsSpan(0, copied).CopyTo(larger);
            if (buffer.Length > 0)
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }

            buffer = larger;
        }

        data.CopyTo(buffer.AsSpan(copied));
        copied += data.Length;
    }

    /// <summary>
    /// The action's <c>BodyWriter</c>: a server keeps one pipe behind a response's stream and its writer, so bytes
    /// the action left in the pipe unflushed go out before what it then writes to the stream. Passing them on from
    /// the stream's side must not pass them again while the pipe itself is passing them to the stream.
    /// </summary>
    private sealed class ActionPipe(ResponseCapture capture, PipeWriter pipe) : PipeWriter
    {
        private bool passing;
        private bool completed;
        private Exception? completedWith;

        /// <summary>True once the action completed the pipe itself: its response is then begun and whole.</summary>
        public bool CompletedByAction { get; private set; }

        /// <summary>The exception the action completed the pipe with: it failed, as it would by throwing it.</summary>
        public Exception? Failure { get; private set; }

        /// <summary>True when the pipe holds bytes the stream has not been given and is not being given them now.</summary>
        public bool Holds => !passing && pipe.UnflushedBytes > 0;

        public override bool CanGetUnflushedBytes => true;

        public override long UnflushedBytes => pipe.UnflushedBytes;

        public override void Advance(int bytes)
        {
            ThrowIfCompleted();
            pipe.Advance(bytes);
        }

        public override Memory<byte> GetMemory(int sizeHint = 0)
        {
            ThrowIfCompleted();
            return pipe.GetMemory(sizeHint);
        }

        public override Span<byte> GetSpan(int sizeHint = 0)
        {
            ThrowIfCompleted();
            return pipe.GetSpan(sizeHint);
        }

        public override void CancelPendingFlush() => pipe.CancelPendingFlush();

        // Kestrel's writer starts sending what is left without blocking; the stream pipe would send it with a
        // synchronous write, which Kestrel refuses (AllowSynchronousIO). It is sent as the action returns
        // (FlushWriterAsync), or if it throws (SendCompletedResponseAsync).
        public override void Complete(Exception? exception = null)
        {
            completed = true;
            completedWith ??= exception;
            CompletedByTheAction(exception);
        }

        public override async ValueTask CompleteAsync(Exception? exception = null)
        {
            CompletedByTheAction(exception);
            await CompletePipeAsync(exception);
        }

        /// <summary>Completes the pipe as the action asked (with its exception, if it gave one), or as a server does at the end.</summary>
        public ValueTask CompleteAsAskedAsync() => CompletePipeAsync(completedWith);

        public override ValueTask<FlushResult> FlushAsync(CancellationToken cancellationToken = default) =>
            Passing(static (pipe, _, cancel) => pipe.FlushAsync(cancel), 0, cancellationToken);

        public override ValueTask<FlushResult> WriteAsync(ReadOnlyMemory<byte> source, CancellationToken cancellationToken = default)
        {
            ThrowIfCompleted();
            return Passing(static (pipe, source, cancel) => pipe.WriteAsync(source, cancel), source, cancellationToken);
        }

        // Completed without an exception, the response is whole and, as a server's, begun: from here on it is sent
        // even if the action fails. Completed with one, a server discards what was not sent and answers 500.
        private void CompletedByTheAction(Exception? exception)
        {
            if (exception is null)
            {
                CompletedByAction = true;
                capture.NoteStart();
            }
            else
            {
                Failure ??= exception;
            }
        }

        private async ValueTask CompletePipeAsync(Exception? exception)
        {
            completed = true;
            passing = true;
            try
            {
                await pipe.CompleteAsync(exception);
            }
            finally
            {
                passing = false;
            }
        }

        private void ThrowIfCompleted()
        {
            if (completed)
            {
                throw new InvalidOperationException("Writing is not allowed after the writer was completed.");
            }
        }

        // Set before the call: the pipe writes to the stream from within it, before it returns.
        private ValueTask<FlushResult> Passing<T>(Func<PipeWriter, T, CancellationToken, ValueTask<FlushResult>> send, T state, CancellationToken cancellationToken)
        {
            passing = true;
            ValueTask<FlushResult> sending;
            try
            {
                sending = send(pipe, state, cancellationToken);
            }
            catch
            {
                passing = false;
                throw;
            }

            if (sending.IsCompleted)
            {
                passing = false;
                return sending;
            }

            return AwaitAsync(sending);
        }

        private async ValueTask<FlushResult> AwaitAsync(ValueTask<FlushResult> sending)
        {
            try
            {
                return await sending;
            }
            finally
            {
                passing = false;
            }
        }
    }
}
