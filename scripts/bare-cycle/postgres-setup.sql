insert into batches(id,tenant,queue,mode,on_item_failure,status,total,pending,running,completed,failed,cancelled,needs_input,request_hash,created_at,updated_at)
 values ('b1','t','q','parallel','continue','running',200000,200000,0,0,0,0,0,'h',now(),now());
insert into items(id,batch_id,tenant,queue,priority,item_index,input,config,status,blocked,attempts,max_attempts,created_at,updated_at)
 select gen_random_uuid()::text,'b1','t','q',0,i,jsonb_build_object('n',i),'{}','pending',false,0,3,now(),now() from generate_series(0,199999) i;
create sequence evseq;
vacuum analyze;
