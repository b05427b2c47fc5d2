insert into batches(id,tenant,queue,mode,on_item_failure,status,total,pending,running,completed,failed,cancelled,needs_input,request_hash,created_at,updated_at,next_index,unclaimed)
 values ('b1','t','q','parallel','continue','running',200000,200000,0,0,0,0,0,'h',now(),now(),0,200000);
insert into items(id,batch_id,tenant,queue,priority,item_index,input,config,status,blocked,attempts,max_attempts,created_at,updated_at)
 select 'i' || i,'b1','t','q',0,i,jsonb_build_object('n',i),'{}','pending',false,0,3,now(),now() from generate_series(0,199999) i;
vacuum analyze;
