using System.Buffers;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// A write-through response stream: every write goes to the client as usual and is also copied, into a pooled
/// buffer, until the copy would pass <see cref="Limit"/>; past that it stops copying (the client still gets every
/// byte) and only counts. Once the client has gone (<paramref name="clientGone"/>) writes are only copied: the
/// action runs on for the client's retry (<see cref="DetachedRequestLifetime"/>), and no server is asked to send
/// to a closed connection.
/// </summary>
internal sealed class ResponseCapture(Stream inner, int limit, CancellationToken clientGone) : Stream
{
    private byte[] buffer = [];
    private int copied;

    /// <summary>The most bytes kept.</summary>
    public int Limit { get; } = limit;

    /// <summary>Bytes written through so far.</summary>
    public long BytesWritten { get; private set; }

    /// <summary>True when the body was larger than <see cref="Limit"/>, so the copy is incomplete.</summary>
    public bool Overflowed { get; private set; }

    public override bool CanRead => false;

    public override bool CanSeek => false;

    public override bool CanWrite => true;

    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => throw new NotSupportedException();
        set => throw new NotSupportedException();
    }

    /// <summary>The copied body; valid when not <see cref="Overflowed"/>.</summary>
    public byte[] ToArray() => Overflowed ? [] : buffer.AsSpan(0, copied).ToArray();

    public override void Write(byte[] buffer, int offset, int count)
    {
        Copy(buffer.AsSpan(offset, count));
        if (!clientGone.IsCancellationRequested)
        {
            inner.Write(buffer, offset, count);
        }
    }

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        Copy(buffer);
        if (!clientGone.IsCancellationRequested)
        {
            inner.Write(buffer);
        }
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
    {
        Copy(buffer.AsSpan(offset, count));
        return clientGone.IsCancellationRequested ? Task.CompletedTask : inner.WriteAsync(buffer, offset, count, cancellationToken);
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        Copy(buffer.Span);
        return clientGone.IsCancellationRequested ? ValueTask.CompletedTask : inner.WriteAsync(buffer, cancellationToken);
    }

    public override void Flush()
    {
        if (!clientGone.IsCancellationRequested)
        {
            inner.Flush();
        }
    }

    public override Task FlushAsync(CancellationToken cancellationToken) =>
        clientGone.IsCancellationRequested ? Task.CompletedTask : inner.FlushAsync(cancellationToken);

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing && buffer.Length > 0)
        {
            ArrayPool<byte>.Shared.Return(buffer);
            buffer = [];
        }

        base.Dispose(disposing);
    }

    private void Copy(ReadOnlySpan<byte> data)
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
}
